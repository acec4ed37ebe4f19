"""The launch configs in cluster/ are valid for the engines that read them."""

from __future__ import annotations

import dask.config
import yaml

from tests.conftest import REPO


def test_slurm_preprocess_config_makes_a_job_script():
    from dask_jobqueue import SLURMCluster

    settings = yaml.safe_load((REPO / "cluster" / "dask" / "slurm_preprocess.yaml").read_text())
    dotted = {f"jobqueue.slurm.{key}": value for key, value in settings["jobqueue"]["slurm"].items()}
    with dask.config.set(dotted):  # on top of dask-jobqueue's defaults, as a ~/.config/dask file would be
        cluster = SLURMCluster(scheduler_options={"host": "127.0.0.1"})
        try:
            script = cluster.job_script()
        finally:
            cluster.close()
    assert "#SBATCH -p cpu" in script and "--cpus-per-task=16" in script
    assert "--nworkers 16" in script and "--nthreads 1" in script
    assert "source .venv/bin/activate" in script
