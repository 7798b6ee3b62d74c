"""`bash bench/gpu_suite.sh --dry-run`: every step of the GPU suite runs on the CPU at tiny sizes, in
conditions that imitate the bare GPU image (fastcd installed only the suite's way, ffcv and nvidia.dali
unimportable), and records its result where the GPU run would bring it back."""
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STEPS = ["install", "env", "kernel-tests", "cuda-ext", "bench-kernels", "bench-train", "bench-loader",
         "bench-train-loaders"]


def failed_logs(out: Path) -> str:
    """The end of each failed step's log, for the assertion message."""
    steps = [json.loads(line) for line in (out / "steps.jsonl").read_text().splitlines()]
    bad = [s["step"] for s in steps if s["status"] != "ok"]
    with tarfile.open(out / "logs.tar.gz") as tar:
        return "\n".join(f"--- {name}:\n" + tar.extractfile(f"logs/{name}.log").read().decode()[-3000:] for name in bad)


def test_dry_run_records_every_step(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "PYTHON": sys.executable}  # the suite works in a fresh temp folder it removes
    env.pop("TRITON_INTERPRET", None)  # the suite sets what it needs
    done = subprocess.run(["bash", "bench/gpu_suite.sh", "--dry-run", "--out", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:] + failed_logs(out)
    steps = [json.loads(line) for line in (out / "steps.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps] == STEPS
    assert all(s["status"] == "ok" for s in steps), steps
    # what comes back from a GPU machine: at most 8 plain files of at most 16 MiB, no folders
    files = list(out.iterdir())
    assert len(files) <= 8 and all(f.is_file() and f.stat().st_size <= 16 * 2**20 for f in files), files
    with tarfile.open(out / "results.tar.gz") as tar:
        names = sorted(Path(n).name for n in tar.getnames() if n.endswith((".json", ".md", ".png")))
        kinds = {n.rsplit("-", 1)[-1] for n in names}
        assert {"kernels.json", "loader.json", "train.json", "train.md", "train.png"} <= kinds, names
        train = json.load(tar.extractfile(next(m for m in tar.getmembers() if m.name.endswith("train.json"))))
    assert [run["data"] for run in train] == ["synthetic", "loader"]
    loaders = {r["knob"]: r for r in train[1]["rows"]}
    assert loaders["loader torch"]["status"] == "ok"
    assert "not installed" in loaders["loader ffcv"]["reason"] and "not installed" in loaders["loader dali"]["reason"]
    summary = (out / "summary.txt").read_text()
    assert all(f"{name} " in summary for name in STEPS)
    with tarfile.open(out / "logs.tar.gz") as tar:
        assert {f"logs/{name}.log" for name in STEPS} <= set(tar.getnames())


def test_a_failing_step_is_recorded_and_the_rest_still_run(tmp_path):
    """A broken step (here: an unknown config) fails alone; its result and log still come back."""
    out = tmp_path / "out"
    env = {**os.environ, "PYTHON": sys.executable}
    script = (ROOT / "bench" / "gpu_suite.sh").read_text().replace(
        "CONFIG=configs/imagenet/", "CONFIG=configs/imagenet/missing-")
    (tmp_path / "suite.sh").write_text(script.replace('ROOT=$(cd "$(dirname "$0")/.." && pwd)', f"ROOT={ROOT}"))
    done = subprocess.run(["bash", str(tmp_path / "suite.sh"), "--dry-run", "--out", str(out), "--only",
                           "bench-kernels,bench-train"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-2000:]
    status = {s["step"]: s for s in map(json.loads, (out / "steps.jsonl").read_text().splitlines())}
    assert list(status) == ["install", "env", "bench-kernels", "bench-train"]
    assert status["bench-kernels"]["status"] == "ok" and status["bench-train"]["status"] == "failed"
    assert "does not exist" in status["bench-train"]["last_line"]
