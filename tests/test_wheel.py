"""A wheel built from the repository and installed outside it has everything the `hf-ext` command needs: the
training recipes by name (`--config grpo_ba`, shipped as `hf_ext.recipes`) and `hf-ext compare-losses`, which finds
them through the package, and the C kernels' sources, which it builds. The installed copy runs, not the editable
checkout."""

import csv
import os
import shutil
import subprocess
import sys
from pathlib import Path


REPO = Path(__file__).resolve().parents[1]


def run(*command: str, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL, **kwargs)
    assert result.returncode == 0, f"{' '.join(command)}\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
    return result


def test_installed_wheel_trains_from_packaged_recipes(tmp_path):
    # Build from a copy of what git sees: an in-tree build would reuse whatever a previous build left in build/.
    lines = [line.strip() for line in (REPO / ".gitignore").read_text().splitlines()]
    ignored = [line.rstrip("/") for line in lines if line and not line.startswith("#")]
    source = tmp_path / "source"
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(".git", *ignored))
    pip = (sys.executable, "-m", "pip", "--disable-pip-version-check")
    run(*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(tmp_path / "wheels"), str(source))
    (wheel,) = (tmp_path / "wheels").glob("hf_ext-*.whl")
    target = tmp_path / "target"
    run(*pip, "install", "--no-deps", "--no-index", "--target", str(target), str(wheel))
    assert sorted(p.name for p in (target / "hf_ext" / "recipes").glob("*.yaml")) == sorted(
        p.name for p in (REPO / "examples" / "configs").glob("*.yaml")
    )

    outside = tmp_path / "outside"  # no examples/ here, and the checkout is not on the path
    outside.mkdir()
    env = {**os.environ, "PYTHONPATH": str(target)}
    imported = run(sys.executable, "-c", "import hf_ext; print(hf_ext.__file__)", cwd=outside, env=env)
    assert Path(imported.stdout.strip()).is_relative_to(target)
    build = (
        "from hf_ext.kernels import cpu_library as c; assert c.load('adamw4bit_step'), c.load_error('adamw4bit_step')"
    )
    run(sys.executable, "-c", build, cwd=outside, env={**env, "HF_EXT_CACHE": str(tmp_path / "cache")})  # C shipped

    hf_ext = str(target / "bin" / "hf-ext")
    trained = tmp_path / "grpo"
    run(hf_ext, "grpo", "--config", "grpo_ba", "--max_steps", "2", "--output_dir", str(trained), cwd=outside, env=env)
    assert (trained / "model.safetensors").exists() and (trained / "recipe.yaml").exists()

    compared = tmp_path / "compare"
    argv = ("compare-losses", "--max_steps", "2", "--seeds", "0", "--loss_types", "ba", "--out", str(compared))
    run(hf_ext, *argv, cwd=outside, env=env)
    with open(compared / "sweep.csv") as handle:
        sweep = list(csv.DictReader(handle))
    assert [row["loss_type"] for row in sweep] == ["ba"] * 5  # the default learning rates, one sweep seed
    best = max(sweep, key=lambda row: float(row["final_reward"]))  # the first of the best on a tie, as picked
    table = (compared / "table.md").read_text().splitlines()
    assert table[0].startswith("| loss_type | lr |")
    assert table[2].startswith(f"| ba | {float(best['learning_rate']):g} |")
    assert (compared / "curves.csv").read_text().startswith("loss_type,seed,step,reward")
