"""`ray job submit` end to end: a separate local Ray head, a real pretokenize job, its output checked.

The head is started here with `ray start --head --block` in its own process group, on explicit free
ports and its own temp dir (tests/ray_nodes.py), so it never meets the pytest session's Ray (`ray_session`),
which is neither used nor touched.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pyarrow.dataset as pads
import pytest
from ray_nodes import EXCLUDES, LocalRayNode, wait_for_job

from pipeline.data.corpus import validate_corpus
from pipeline.data.preprocess import center_crop_adm, decode_image, to_model_input

REPO = Path(__file__).resolve().parents[1]
NUM_IMAGES = 8


@pytest.fixture
def ray_head():
    head = LocalRayNode()
    try:
        head.wait_ready()
        yield head
    finally:
        head.stop()


@pytest.fixture
def job_inputs(tmp_path, tiny_model, imagenet_sample) -> dict[str, Path]:
    """A tiny tokenizer saved to disk and a few real photos (with their labels.csv rows)."""
    model_dir = tmp_path / "model"
    tiny_model.save_pretrained(model_dir)
    images = tmp_path / "images"
    images.mkdir()
    header, *rows = (imagenet_sample / "labels.csv").read_text().splitlines()
    rows = rows[:NUM_IMAGES]
    for row in rows:
        shutil.copy(imagenet_sample / row.split(",")[0], images)
    (images / "labels.csv").write_text("\n".join([header, *rows]) + "\n")
    return {"model": model_dir, "images": images, "output": tmp_path / "corpus"}


def test_submitted_pretokenize_job_succeeds_and_writes_the_corpus(ray_head, job_inputs, tiny_model):
    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(ray_head.dashboard_url)
    entrypoint = (
        f"python jobs/pretokenize.py --model {job_inputs['model']} --input {job_inputs['images']}"
        f" --output {job_inputs['output']} --resolution 32 --batch-size 4 --gpus-per-worker 0 --workers 1"
    )
    job_id = client.submit_job(
        entrypoint=entrypoint,
        runtime_env={"working_dir": str(REPO), "excludes": EXCLUDES, "env_vars": {"PYTHONUNBUFFERED": "1"}},
    )
    status, logs = wait_for_job(client, job_id)
    assert status == JobStatus.SUCCEEDED, f"job {job_id} ended {status}:\n{logs[-4000:]}"

    assert validate_corpus(str(job_inputs["output"])).problems == []
    table = pads.dataset(job_inputs["output"] / "data", format="parquet").to_table().sort_by("key")
    stems = sorted(p.stem for p in job_inputs["images"].glob("*.JPEG"))
    assert table.column("key").to_pylist() == stems
    # The job's tokens are the tokenizer's own: check the first image end to end.
    image = center_crop_adm(decode_image((job_inputs["images"] / f"{stems[0]}.JPEG").read_bytes()), 32)
    expected = tiny_model.tokenize(to_model_input(image[None]))[0].tolist()
    assert table.column("tokens")[0].as_py() == expected
