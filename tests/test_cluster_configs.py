"""The launch configs in cluster/ are valid for the engines that read them."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys

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


# ---------------------------------------------------------------- training launch configs (stage 1 and later)

ACCELERATE_CONFIGS = sorted((REPO / "cluster" / "accelerate").glob("*.yaml"))
DEEPSPEED_CONFIGS = sorted((REPO / "cluster" / "deepspeed").glob("*.json"))


def test_accelerate_configs_load_with_accelerate_and_name_existing_deepspeed_files():
    from accelerate.commands.config.config_args import ClusterConfig

    names = {path.stem for path in ACCELERATE_CONFIGS}
    assert {"cpu2", "gpu1", "gpu8", "gpu8_zero2", "gpu8_zero3", "multinode"} <= names
    for path in ACCELERATE_CONFIGS:
        config = ClusterConfig.from_yaml_file(str(path))  # rejects unknown keys
        settings = yaml.safe_load(path.read_text())
        assert config.num_processes == settings["num_processes"] >= 1, path.name
        if settings["num_processes"] > 1:
            # the REFERENCE §5 trap: --cpu/use_cpu with 2 processes silently runs one
            assert settings["use_cpu"] is False, path.name
        if config.distributed_type == "DEEPSPEED":
            assert (REPO / config.deepspeed_config["deepspeed_config_file"]).is_file(), path.name


def test_deepspeed_configs_are_complete_once_the_engine_fills_them():
    from vasa.training.engine import deepspeed_settings

    cfg = _train_config()
    stages = {}
    for path in DEEPSPEED_CONFIGS:
        template = json.loads(path.read_text())
        filled = deepspeed_settings(template, cfg, "bf16")
        assert "auto" not in json.dumps(filled), path.name  # nothing left for DeepSpeed to guess
        assert filled["train_micro_batch_size_per_gpu"] == cfg.batch_size and filled["bf16"] == {"enabled": True}
        stages[path.stem] = filled["zero_optimization"]["stage"]
    assert stages == {"zero2": 2, "zero3": 3}


def _train_config():
    from vasa.config import load_params

    return load_params(REPO / "params.yaml").train_latent.train


def _slurm_env(**changes) -> dict:
    env = {"SLURM_JOB_NODELIST": "gpu[007-008],gpu010", "SLURM_NNODES": "3", "SLURM_NODEID": "2"}
    return dict(os.environ) | env | {"SLURM_GPUS_ON_NODE": "8", "SLURM_JOB_ID": "4242"} | changes


def test_slurm_launch_command_renders_rendezvous_from_the_node_list():
    from accelerate.commands.launch import launch_command_parser

    script = REPO / "cluster" / "slurm" / "accelerate_command.py"
    args = ["--params", "params.yaml", "--shards", "data/shards", "--out", "data/latent", "--resume"]
    done = subprocess.run(
        [sys.executable, str(script), "--print", "--", *args], env=_slurm_env(), capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    command = shlex.split(done.stdout)
    assert command[:2] == ["accelerate", "launch"]
    launch = launch_command_parser().parse_args(command[2:])  # accelerate's own parser accepts every flag
    assert launch.main_process_ip == "gpu007" and launch.main_process_port == 20000 + 4242
    assert launch.num_machines == 3 and launch.num_processes == 24 and launch.machine_rank == 2
    assert launch.config_file == "cluster/accelerate/multinode.yaml" and launch.module
    assert launch.training_script == "vasa.train_latent" and launch.training_script_args == args
    bad = subprocess.run(
        [sys.executable, str(script), "--print"], env=_slurm_env(SLURM_NNODES="2"), capture_output=True, text=True
    )
    assert bad.returncode != 0 and "SLURM_NNODES=2" in bad.stderr


def test_slurm_node_list_expansion():
    sys.path.insert(0, str(REPO / "cluster" / "slurm"))
    try:
        from accelerate_command import expand_nodelist
    finally:
        sys.path.pop(0)
    assert expand_nodelist("gpu[001-003,007],login1") == ["gpu001", "gpu002", "gpu003", "gpu007", "login1"]
    assert expand_nodelist("a1,b2") == ["a1", "b2"] and expand_nodelist("r1-[1-2]x") == ["r1-1x", "r1-2x"]


def test_sbatch_script_is_valid_bash_with_one_launcher_per_node():
    script = REPO / "cluster" / "slurm" / "train_latent.sbatch"
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    text = script.read_text()
    assert "#SBATCH --ntasks-per-node=1" in text  # accelerate launch starts the GPU processes itself
    assert re.search(r"^srun .*cluster/slurm/accelerate_command\.py", text, re.M)
