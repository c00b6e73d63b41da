"""Two nodes on one machine, as a cluster job launches them: two drivers started at once with
``--nnodes 2 --node_rank 0/1``, one process each, gloo on the CPU, sharing one base folder as
nodes share a file system. Each stage's result must be what the design promises for any number
of processes: the same combined states (the same occurrences) and bitwise the same dictionary
and targets as one process; the same trained student as the same two ranks on one node."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from embdistill.artifacts import load_pickle, read_manifest
from embdistill.drivers import main as run_driver
from embdistill.paths import Paths
from helpers import free_port, run_stage
from test_cluster import assert_same_dictionary
from test_drivers import user_data
from test_gather import assert_same_combined
from test_train_stage import subprocess_env

REPO = Path(__file__).resolve().parents[1]
GATHER = ["--max-length", "32", "--batch-size", "8", "--per-token", "6"]
CLUSTER = ["--batch-tokens", "8"]
TRAIN = ["--loss", "sense", "--student-layers", "1", "--max-steps", "2", "--batch-size", "4", "--max-length", "32"]


def on_two_nodes(script: str, *args: str) -> None:
    """The driver once per node, both at once, as two machines of a job start it."""
    port = str(free_port())
    runs = [subprocess.Popen(["bash", str(REPO / script), *args, "--nnodes", "2", "--node_rank", str(node),
                              "--nproc_per_node", "1", "--master_addr", "127.0.0.1", "--master_port", port],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                             env=subprocess_env())
            for node in range(2)]
    for node, run in enumerate(runs):
        _, err = run.communicate(timeout=600)
        assert run.returncode == 0, f"{script} on node {node}:\n{err[-3000:]}"


@pytest.mark.slow
def test_two_nodes_on_one_machine_equal_one_node(tmp_path, tiny_bert_dir):
    data = user_data(tmp_path / "data.jsonl")
    nodes, alone = tmp_path / "two-nodes", tmp_path / "one-process"
    task = [str(data), "--teacher", str(tiny_bert_dir)]
    for base in (nodes, alone):
        assert run_stage("scripts/00_texts.py", "--task", str(data), "--base-dir", str(base)) == 0
    paths = Paths(nodes, "data", tiny_bert_dir.name)

    on_two_nodes("run_gather_sense.sh", *task, *GATHER, "--base-dir", str(nodes))
    assert not paths.combined.exists()  # left for one machine once all are done, as the driver says:
    assert run_stage("a0_generate_combinepkl.py", "--task", *task, "--base-dir", str(nodes)) == 0
    assert run_driver(["gather_sense", *task, *GATHER, "--base-dir", str(alone)]) == 0
    assert read_manifest(paths.gather_dir / "rank1.pkl")["config"]["world_size"] == 2
    assert_same_combined(load_pickle(paths.combined), load_pickle(Paths(alone, "data", tiny_bert_dir.name).combined),
                         atol=1e-5)  # batches of other texts: other padding, last bits

    on_two_nodes("run_multithread_cluster.sh", *task, *CLUSTER, "--base-dir", str(nodes))
    assert read_manifest(paths.sense_dict)["extra"]["world_size"] == 2
    one_dictionary = tmp_path / "one.kmeanspkl"
    assert run_stage("scripts/03_cluster.py", "--task", *task, *CLUSTER, "--base-dir", str(nodes),
                     "--output", str(one_dictionary)) == 0
    assert_same_dictionary(paths.sense_dict, one_dictionary)

    on_two_nodes("run_train.sh", *task, *TRAIN, "--base-dir", str(nodes))
    one_targets = tmp_path / "one-targets.npz"
    assert run_stage("scripts/04_targets.py", "--task", *task, "--max-length", "32", "--base-dir", str(nodes),
                     "--output", str(one_targets)) == 0
    assert paths.targets.read_bytes() == one_targets.read_bytes()
    port = str(free_port())  # the same two ranks on one node (what torchrun --nproc_per_node 2 sets)
    ranks = [subprocess.Popen([sys.executable, str(REPO / "scripts" / "05_train.py"), "--task", *task, *TRAIN,
                               "--base-dir", str(nodes), "--run", "one-node"], stderr=subprocess.PIPE, text=True,
                              env={**subprocess_env(), "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": "2",
                                   "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port})
             for r in range(2)]
    for rank in ranks:
        _, err = rank.communicate(timeout=600)
        assert rank.returncode == 0, err[-3000:]
    students = [load_file(Paths(nodes, "data", tiny_bert_dir.name, run).export_dir / "hf" / "model.safetensors")
                for run in ("skd", "one-node")]
    assert students[0].keys() == students[1].keys()
    for name, weights in students[0].items():
        assert weights.equal(students[1][name]), name
