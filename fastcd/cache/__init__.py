"""The teacher-target cache: what CD, KD/GKD and RKD read of a frozen teacher, stored once per crop.

CD needs only the per-channel spatial means of the teacher's four stage outputs (960 numbers for a
ResNet-34), KD and GKD its logits, RKD its pooled embedding: a few kilobytes per crop. Because every crop
is a pure function of (seed, epoch, sample) (`fastcd.data.crops`), `fastcd cache-teacher` can run the
teacher once over E epochs of crops and store these targets by sample index; training with
`teacher.cache` then builds no teacher and reads them instead.

Layout of a cache folder: `manifest.json` (format, what the targets depend on, what is stored, the
finished epochs) and per epoch `epoch-NNNN/` with `.npy` arrays indexed by sample: `means` (S, sum C),
`logits` (S, K) or `topk_values` + `topk_indices` (S, k) + `tail_lse` (S, 1), `embed` (S, D). An epoch is
written in `epoch-NNNN.partial/` with a `progress.json` and renamed when complete, so an interrupted write
resumes.
"""
