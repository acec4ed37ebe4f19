"""The launch configs in cluster/ are valid for the engines that read them."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import dask.config
import pytest
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
    assert {"cpu2", "gpu1", "gpu8", "gpu8_zero2", "gpu8_zero3", "gpu8_zero3_offload", "multinode"} <= names
    for path in ACCELERATE_CONFIGS:
        config = ClusterConfig.from_yaml_file(str(path))  # rejects unknown keys
        settings = yaml.safe_load(path.read_text())
        assert config.num_processes == settings["num_processes"] >= 1, path.name
        if settings["num_processes"] > 1:
            # Accelerate's trap: --cpu/use_cpu with 2 processes silently runs one
            assert settings["use_cpu"] is False, path.name
        if config.distributed_type == "DEEPSPEED":
            assert (REPO / config.deepspeed_config["deepspeed_config_file"]).is_file(), path.name


def test_deepspeed_configs_are_complete_once_the_engine_fills_them():
    from vasa.training.placement import deepspeed_settings

    cfg = _train_config()
    stages = {}
    for path in DEEPSPEED_CONFIGS:
        template = json.loads(path.read_text())
        filled = deepspeed_settings(template, cfg, "bf16")
        assert "auto" not in json.dumps(filled), path.name  # nothing left for DeepSpeed to guess
        assert filled["train_micro_batch_size_per_gpu"] == cfg.batch_size and filled["bf16"] == {"enabled": True}
        stages[path.stem] = filled["zero_optimization"]["stage"]
    assert stages == {"zero2": 2, "zero3": 3, "zero3_offload": 3}
    offload = json.loads((REPO / "cluster" / "deepspeed" / "zero3_offload.json").read_text())["zero_optimization"]
    assert offload["offload_optimizer"]["device"] == offload["offload_param"]["device"] == "cpu"


def _train_config():
    from vasa.core.config import load_params

    return load_params(REPO / "params.yaml").train_latent.train


def _slurm_env(**changes) -> dict:
    env = {"SLURM_JOB_NODELIST": "gpu[007-008],gpu010", "SLURM_NNODES": "3", "SLURM_NODEID": "2"}
    return dict(os.environ) | env | {"SLURM_GPUS_ON_NODE": "8", "SLURM_JOB_ID": "4242"} | changes


def test_slurm_launch_command_renders_rendezvous_from_the_node_list():
    from accelerate.commands.launch import launch_command_parser

    script = REPO / "cluster" / "slurm" / "accelerate_command.py"
    args = ["--params", "params.yaml", "train-latent", "--shards", "data/shards", "--out", "data/latent", "--resume"]
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
    assert launch.training_script == "vasa.cli" and launch.training_script_args == args
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


# ---------------------------------------------------------------- Slurm scripts, dry-run with recording shims


def _dry_run(script: Path, args: list[str], tmp_path: Path, env: dict) -> list[list[str]]:
    """Run a batch script with `srun`, `scontrol`, `dask` and `python` replaced by shims that record their
    argv (one JSON list per line) instead of running: the commands the script would launch, in order."""
    shims = tmp_path / "shims"
    shims.mkdir()
    log = tmp_path / "commands.jsonl"
    recorder = f"#!{sys.executable}\nimport json, os, sys\n"
    recorder += f"open({str(log)!r}, 'a').write(json.dumps([os.path.basename(sys.argv[0]), *sys.argv[1:]]) + '\\n')\n"
    recorder += "if os.path.basename(sys.argv[0]) == 'scontrol':\n    print('\\n'.join(['gpu007', 'gpu008']))\n"
    for name in ("srun", "scontrol", "dask", "python"):
        (shims / name).write_text(recorder)
        (shims / name).chmod(0o755)
    work = tmp_path / "checkout"  # the script sources .venv/bin/activate: this one puts the shims first
    (work / ".venv" / "bin").mkdir(parents=True)
    (work / ".venv" / "bin" / "activate").write_text(f'export PATH="{shims}:$PATH"\n')
    # A script's EXIT trap kills its background jobs (dask scheduler, workers); under load that could land
    # before their shims wrote a line. Here `kill` waits for them instead (bash sources BASH_ENV first).
    bash_env = tmp_path / "bash_env"
    bash_env.write_text("kill() { wait; }\n")
    env = env | {"BASH_ENV": str(bash_env)}
    done = subprocess.run(["bash", str(script), *args], cwd=work, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in log.read_text().splitlines()]


def _slurm_job_env(**changes) -> dict:
    env = {"SLURM_JOB_NODELIST": "gpu[007-008]", "SLURM_JOB_NUM_NODES": "2", "SLURM_NNODES": "2"}
    return dict(os.environ) | env | {"SLURM_JOB_ID": "4242", "SLURM_CPUS_PER_TASK": "16", "TMPDIR": "/tmp"} | changes


@pytest.mark.parametrize("stage", ["train_latent", "train_motion"])
def test_training_sbatch_scripts_launch_one_accelerate_per_node(stage, tmp_path):
    from accelerate.commands.launch import launch_command_parser

    script = REPO / "cluster" / "slurm" / f"{stage}.sbatch"
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    data = {"train_latent": "--shards", "train_motion": "--motion"}[stage]
    commands = _dry_run(script, ["params.yaml", "data/in", "data/out", "--resume"], tmp_path, _slurm_job_env())
    srun = next(c for c in commands if c[0] == "srun")
    node = srun[srun.index("python") + 1 :]  # what each node runs: accelerate_command.py, here with --print
    assert node[0] == "cluster/slurm/accelerate_command.py"
    env = _slurm_env(SLURM_JOB_NODELIST="gpu[007-008]", SLURM_NNODES="2", SLURM_NODEID="1")
    done = subprocess.run(
        [sys.executable, str(REPO / node[0]), "--print", *node[1:]], env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    command = shlex.split(done.stdout)
    launch = launch_command_parser().parse_args(command[2:])
    assert launch.module and launch.training_script == "vasa.cli"
    assert launch.num_machines == 2 and launch.num_processes == 16 and launch.machine_rank == 1
    command = stage.replace("_", "-")
    expected = ["--params", "params.yaml", command, data, "data/in", "--out", "data/out", "--no-progress", "--resume"]
    assert launch.training_script_args == expected
    from vasa.cli import build_parser

    parsed = build_parser().parse_args(launch.training_script_args)  # the vasa CLI accepts them
    assert parsed.out == Path("data/out") and parsed.resume


def test_dask_preprocess_sbatch_runs_scheduler_workers_and_vasa_preprocess(tmp_path):
    from distributed.cli.dask_scheduler import main as scheduler_cli
    from distributed.cli.dask_worker import main as worker_cli

    from vasa.cli import build_parser

    script = REPO / "cluster" / "slurm" / "preprocess_dask.sbatch"
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    args = ["params.yaml", "data/ingest/manifest.parquet", "data/shards", "data/preprocess_cache"]
    commands = _dry_run(script, args, tmp_path, _slurm_job_env())
    # scheduler and workers start in the background: their order against the rest is not fixed
    programs = sorted(c[0] if c[0] != "srun" else "srun " + c[c.index("--kill-on-bad-exit=1") + 1] for c in commands)
    assert programs == ["dask", "python", "python", "scontrol", "srun dask"]
    scheduler = next(c for c in commands if c[0] == "dask")
    workers = next(c for c in commands if c[0] == "srun")
    params_cmd, preprocess = [c for c in commands if c[0] == "python"]  # in this order: the driver waits
    assert scheduler[1] == "scheduler" and workers[3] == "worker"
    scheduler_cli.make_context("dask scheduler", scheduler[2:])  # dask's own option parsers accept the flags
    worker_options = worker_cli.make_context("dask worker", workers[4:]).params
    assert worker_options["n_workers"] == "16" and worker_options["nthreads"] == 1
    port = 20000 + 4242
    assert params_cmd[1:4] == ["cluster/slurm/dask_params.py", "params.yaml", f"tcp://gpu007:{port}"]
    assert params_cmd[params_cmd.index("--wait-workers") + 1] == "32"  # 2 nodes x 16 cores
    parsed = build_parser().parse_args(preprocess[3:])
    assert parsed.stage == "preprocess" and parsed.out == Path("data/shards")
    assert preprocess[1:3] == ["-m", "vasa.cli"] and parsed.params == Path(params_cmd[params_cmd.index("--out") + 1])

    # The params file it renders is valid for the project and names the cluster.
    from vasa.core.config import load_params

    out = tmp_path / "run" / "params.yaml"
    helper = REPO / "cluster" / "slurm" / "dask_params.py"
    rendered = [str(helper), str(REPO / "params.yaml"), f"tcp://gpu007:{port}", "--out", str(out), "--workers", "32"]
    subprocess.run([sys.executable, *rendered], check=True)
    runner = load_params(out).preprocess.runner
    assert (runner.kind, runner.dask_address, runner.workers) == ("dask", f"tcp://gpu007:{port}", 32)


def test_prefect_deployment_recipe_names_the_retrain_flow_and_its_parameters():
    import inspect

    from prefect.flows import load_flow_from_entrypoint

    from vasa.core.config import load_params

    recipe = yaml.safe_load((REPO / "cluster" / "prefect" / "prefect.yaml").read_text())
    (deployment,) = recipe["deployments"]
    flow = load_flow_from_entrypoint(str(REPO / deployment["entrypoint"]))
    assert flow.name == "retrain"
    assert set(deployment["parameters"]) <= set(inspect.signature(flow.fn).parameters)
    assert deployment["schedules"][0]["cron"] == load_params(REPO / "params.yaml").retrain.cron
    assert deployment["work_pool"]["name"] in (REPO / "cluster" / "README.md").read_text()
