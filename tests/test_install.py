"""A non-editable `pip install .` works away from the checkout: the mapped packages (kernels, data_prep,
bench), the shipped configs as package data, and the `fastcd` command."""
import os
import site
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv over this interpreter's packages (torch and the rest), with fastcd built as a wheel
    from a copy of the checkout and installed into it (offline, no dependencies)."""
    root = tmp_path_factory.mktemp("install")
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    parents = [*site.getsitepackages(), sysconfig.get_paths()["purelib"]]
    Path(purelib, "_parent.pth").write_text("\n".join(dict.fromkeys(parents)) + "\n")
    src = root / "src"  # a copy: the build writes build/ and *.egg-info next to setup.py
    files = subprocess.run(["git", "-C", str(ROOT), "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
                           capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, files):
        if (ROOT / name).is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            (src / name).write_bytes((ROOT / name).read_bytes())
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-deps",
                    "--no-build-isolation", "--no-index", "--ignore-installed", str(src)], check=True, timeout=600)
    return venv


def run(venv: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TRITON_INTERPRET")}
    return subprocess.run([str(venv / "bin" / "fastcd"), *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)


def test_the_installed_package_is_not_the_checkout(installed: Path, tmp_path: Path) -> None:
    code = "import fastcd, fastcd.kernels, fastcd.bench, fastcd.data_prep, fastcd.paths as p; " \
           "print(fastcd.__file__, p.SOURCE_ROOT, p.configs_dir(), p.results_dir())"
    out = subprocess.run([str(installed / "bin" / "python"), "-c", code], cwd=tmp_path, capture_output=True,
                         text=True, check=True).stdout.split()
    assert str(installed) in out[0] and out[1] == "None"
    assert Path(out[2], "imagenet", "s_resnet18.baseline.yaml").is_file()
    assert out[3] == str(tmp_path / "fastcd-results")


def test_commands_run_from_another_directory(installed: Path, tmp_path: Path) -> None:
    for args in (["demo", "--help"], ["bench", "train", "--help"], ["bench", "--help"]):
        done = run(installed, *args, cwd=tmp_path)
        assert done.returncode == 0 and "usage" in done.stdout, done.stderr[-2000:]
    done = run(installed, "train", "configs/imagenet/s_resnet18.baseline.yaml", "--set", "data.backend=synthetic",
               "student.width=0.0625", "student.num_classes=4", "student.stem=cifar", "data.res=16",
               "data.val_res=16", "data.batch_size=16", "data.train_subset=32", "data.val_subset=16",
               "train.epochs=1", "train.device=cpu", "train.progress=false", f"train.out_dir={tmp_path / 'run'}",
               cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "run" / "latest.pt").is_file()
