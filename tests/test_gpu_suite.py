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
# what nobody has measured first: the fed step, the host feed, the demo; kernels and the ablation last
STEPS = ["install", "env", "train-fed", "bench-feed", "demo", "kernel-tests", "cuda-ext", "bench-kernels",
         "bench-train", "bench-loader"]


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
        kinds = {n.split("-", 4)[-1] for n in names}  # <date>-<machine>-<kind>
        assert {"kernels.json", "loader.json", "train.json", "train.md", "train.png", "train-feed.json",
                "train-feed-loader.md", "feed.json", "table.md"} <= kinds, names

        def runs(kind: str) -> list[dict]:
            return json.load(tar.extractfile(next(m for m in tar.getmembers()
                                                  if Path(m.name).name.split("-", 4)[-1] == f"{kind}.json")))

        train, fed, feed = runs("train"), runs("train-feed"), runs("feed")
    assert [run["data"] for run in train] == ["synthetic"] and train[0]["ablation"]
    assert [r["knob"] for r in fed[0]["rows"]] == ["on-device data", "torch loader, device decode"]
    assert all(r["status"] == "ok" for r in fed[0]["rows"]) and "wait_ms_per_step" in fed[0]["rows"][1]
    assert {r["row"] for r in feed[0]["rows"]} == {"feed", "per-sample", "loader"}
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
    assert list(status) == ["install", "env", "bench-kernels", "bench-train"]  # in the suite's order
    assert status["bench-kernels"]["status"] == "ok" and status["bench-train"]["status"] == "failed"
    assert "does not exist" in status["bench-train"]["last_line"]


def test_a_wait_that_never_ends_is_cut_at_its_step_budget(tmp_path):
    """The fed step waits for the background data job: when that job hangs, the step ends at its budget as
    timed_out, its log and record come back, the suite still ends, and the hung job is killed."""
    out = tmp_path / "out"
    env = {**os.environ, "PYTHON": sys.executable}
    script = (ROOT / "bench" / "gpu_suite.sh").read_text()
    hang = "import time; time.sleep(600)  # hung data job"
    script = script.replace("generated_dataset(Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]))", hang)
    script = script.replace("step train-fed 220 ", "step train-fed 12 ")
    assert hang in script and "step train-fed 12 " in script
    (tmp_path / "suite.sh").write_text(script.replace('ROOT=$(cd "$(dirname "$0")/.." && pwd)', f"ROOT={ROOT}"))
    done = subprocess.run(["bash", str(tmp_path / "suite.sh"), "--dry-run", "--out", str(out), "--only", "train-fed"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-2000:]
    status = {s["step"]: s for s in map(json.loads, (out / "steps.jsonl").read_text().splitlines())}
    assert list(status) == ["install", "env", "train-fed"]
    assert status["train-fed"]["status"] == "timed_out" and status["train-fed"]["seconds"] < 40
    with tarfile.open(out / "logs.tar.gz") as tar:
        assert "logs/train-fed.log" in tar.getnames()
    hung = subprocess.run(["pgrep", "-f", "hung data job"], capture_output=True, text=True)
    assert hung.stdout.strip() == "", "the hung data job outlived the suite"
