"""`pip install` of the checkout (not editable) is a working dist-lm outside the checkout: the
package with its presets as package data, a `dist-lm` command, and nothing that reaches back
into the checkout."""

from __future__ import annotations

import subprocess
import sys

from conftest import ROOT, assert_ok, read_metrics


def test_installed_package_trains_and_plans_outside_the_checkout(env, ds_ops, tmp_path):
    site = tmp_path / "site"
    install = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "--no-compile",
            "--target",
            str(site),
            str(ROOT),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert install.returncode == 0, install.stderr
    # The installed copy comes first on the path, before the checkout's editable install.
    env = {**env, "PYTHONPATH": str(site)}
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    where = subprocess.run(
        [sys.executable, "-c", "import dist_lm; print(dist_lm.__file__)"],
        env=env,
        cwd=outside,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert where.stdout.strip().startswith(str(site)), where.stdout + where.stderr
    command = site / "bin" / "dist-lm"
    assert command.is_file()

    train = subprocess.run(
        [sys.executable, str(command), "train", "--preset", "debug", "train.max_steps=5", "run.dir=run"],
        env=env,
        cwd=outside,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert_ok(train)
    rows, _ = read_metrics(outside / "run")
    assert rows[-1]["step"] == 5
    plan = subprocess.run(
        [sys.executable, "-m", "dist_lm", "plan"], env=env, cwd=outside, capture_output=True, text=True, timeout=120
    )
    assert_ok(plan)
    assert "plan: preset debug" in plan.stdout
    # what it suggests runs from the install: no launch template of a checkout
    assert "dist-lm train " in plan.stdout and "launchers/" not in plan.stdout
