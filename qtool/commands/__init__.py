"""CLI commands, one module per concern; ``COMMANDS`` is what ``qtool.cli`` mounts."""

from qtool.commands.bench import bench_cmd
from qtool.commands.data import data_group
from qtool.commands.ptq import ptq_cmd
from qtool.commands.qat import qat_cmd
from qtool.commands.sweep import sweep_cmd
from qtool.commands.train import eval_cmd, export_cmd, run_cmd, train_cmd

COMMANDS = [data_group, train_cmd, eval_cmd, export_cmd, ptq_cmd, run_cmd, bench_cmd, qat_cmd, sweep_cmd]
