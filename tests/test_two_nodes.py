"""Two Ray nodes on one machine, jobs submitted with JobSubmissionClient, data only on the S3 server.

The head gets 0 CPUs (it runs the job drivers and the dashboard, no work), the worker node 2 CPUs; each has
its own temp dir and ports (tests/ray_nodes.py). Neither node inherits the S3 variables or PYTHONPATH from
this process: the jobs get the S3 variables through their runtime_env, and their code through working_dir,
as on a real cluster. A pretokenize job (tokenizer and shards on s3://) and then a 2-worker AR training job
on the corpus it wrote (checkpoints on s3://) must succeed, and their outputs are checked in the bucket.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import fsspec
import pytest
from conftest import FEW_FOOTER_READERS, upload_sample
from ray_nodes import EXCLUDES, LocalRayNode, wait_for_job

REPO = Path(__file__).resolve().parents[1]
NUM_IMAGES, SHARD_SIZE, AR_STEPS = 8, 4, 4
S3_VARS = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")


@pytest.fixture(scope="module")
def cluster(s3_env):
    """(head, worker node); both stopped at the end, whatever happened."""
    drop = (*S3_VARS, "PYTHONPATH")
    nodes = [LocalRayNode(num_cpus=0, drop_env=drop)]
    try:
        nodes[0].wait_ready()
        nodes.append(LocalRayNode(num_cpus=2, gcs_address=nodes[0].gcs_address, drop_env=drop))
        nodes[1].wait_ready()
        yield nodes[0], nodes[1]
    finally:
        for node in reversed(nodes):
            node.stop()


@pytest.fixture(scope="module")
def inputs(s3_env, s3_bucket, tiny_model, imagenet_sample, tmp_path_factory) -> dict[str, str]:
    """A tiny tokenizer and webdataset shards of a few photos, in the bucket."""
    from jobs.make_shards import main as make_shards

    root = f"{s3_bucket}/two-nodes-{uuid.uuid4().hex[:8]}"
    s3 = fsspec.filesystem("s3")
    model_dir = tmp_path_factory.mktemp("model")
    tiny_model.save_pretrained(model_dir)
    for name in ("config.json", "model.safetensors"):
        s3.put_file(str(model_dir / name), f"{root}/model/{name}")
    upload_sample(s3, imagenet_sample, f"{root}/raw", NUM_IMAGES)
    argv = ["--input", f"{root}/raw", "--output", f"{root}/shards", "--shard-size", str(SHARD_SIZE)]
    assert make_shards(argv) == 0
    return {"root": root, "model": f"{root}/model", "shards": f"{root}/shards/shard-*.tar"}


def submit(cluster, s3_env: dict[str, str], entrypoint: str) -> None:
    """Submit `entrypoint` to the head, wait, and fail with the job's log unless it succeeded."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    head, _ = cluster
    client = JobSubmissionClient(head.dashboard_url)
    env_vars = {**s3_env, "PYTHONUNBUFFERED": "1", FEW_FOOTER_READERS[0]: FEW_FOOTER_READERS[1]}
    job_id = client.submit_job(
        entrypoint=entrypoint, runtime_env={"working_dir": str(REPO), "excludes": EXCLUDES, "env_vars": env_vars}
    )
    status, logs = wait_for_job(client, job_id)
    assert status == JobStatus.SUCCEEDED, f"job {job_id} ended {status}:\n{logs[-4000:]}"


@pytest.fixture(scope="module")
def corpus(cluster, s3_env, inputs) -> str:
    url = f"{inputs['root']}/corpus"
    submit(
        cluster,
        s3_env,
        f"python jobs/pretokenize.py --model {inputs['model']} --input '{inputs['shards']}' --output {url} "
        "--batch-size 4 --gpus-per-worker 0 --workers 1",
    )
    return url


def test_pretokenize_job_across_two_nodes_writes_a_valid_corpus_to_the_bucket(corpus, tiny_model, imagenet_sample):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.data.corpus import validate_corpus
    from pipeline.data.preprocess import center_crop_adm, decode_image, to_model_input

    v = validate_corpus(corpus)
    assert v.problems == [] and v.rows == NUM_IMAGES and v.shards == NUM_IMAGES // SHARD_SIZE
    s3 = fsspec.filesystem("s3")
    table = pa.concat_tables(pq.read_table(p, filesystem=s3) for p in sorted(s3.glob(f"{corpus}/data/*.parquet")))
    row = table.sort_by("key").slice(0, 1).to_pylist()[0]
    # the job's tokens are the tokenizer's own (the model was read from the bucket on the worker node)
    image = center_crop_adm(decode_image((imagenet_sample / f"{row['key']}.JPEG").read_bytes()), 32)
    assert row["tokens"] == tiny_model.tokenize(to_model_input(image[None]))[0].tolist()


@pytest.fixture(scope="module")
def ar_run(cluster, s3_env, corpus, inputs) -> str:
    run = f"{inputs['root']}/runs/ar"
    submit(
        cluster,
        s3_env,
        f"python jobs/train_ar.py --config configs/train_ar_tiny.yaml --corpus {corpus} --output {run} "
        f"--workers 2 --cpus-per-worker 0.5 --steps {AR_STEPS} --batch-size 4 --checkpoint-every 2 "
        "--log-every 1",
    )
    return run


def test_two_worker_training_job_checkpoints_to_the_bucket(ar_run):
    from flextok.ar import ARModel
    from pipeline.train.common import read_events, read_metrics

    s3 = fsspec.filesystem("s3")
    s3.invalidate_cache()
    final = f"{ar_run}/checkpoint_{AR_STEPS:08d}"
    assert ARModel.from_pretrained(f"{final}/ema").cfg.max_tokens == 32
    assert s3.isfile(f"{final}/train_state.pt")
    events = read_events(f"{ar_run}/tensorboard")
    assert [(e["event"], e["world_size"]) for e in events] == [("started", 2)]
    assert [m["step"] for m in read_metrics(f"{ar_run}/tensorboard")] == list(range(1, AR_STEPS + 1))
    snapshot = json.loads(s3.cat_file(f"{ar_run}/checkpoint_manager_snapshot.json"))
    assert snapshot["latest_checkpoint_result"]["checkpoint_dir_name"] == f"checkpoint_{AR_STEPS:08d}"
