"""The pipeline against real S3 protocol: moto's server on 127.0.0.1, reached through s3fs."""

from __future__ import annotations

import gzip
import json
import socket
import subprocess
import sys
import time

import pyarrow.dataset as ds
import pytest

from lmc_audit.pipelines.audit import run
from lmc_audit.pipelines.decode import run as decode


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3_server():
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.time() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if time.time() > deadline or proc.poll() is not None:
                proc.kill()
                raise RuntimeError("moto server did not start")
            time.sleep(0.2)
    yield endpoint
    proc.terminate()
    proc.wait(10)


@pytest.fixture
def s3(s3_server, monkeypatch):
    # What a user sets for any S3-compatible store; s3fs (botocore) reads these.
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    fs = s3fs.S3FileSystem()
    bucket = f"audit-{time.time_ns()}"
    fs.mkdir(bucket)
    return fs, bucket


def test_pipeline_reads_and_writes_s3(s3, tiny_byte_model, tmp_path):
    fs, bucket = s3
    docs = [{"id": f"d{i}", "text": f"document {i} about s3 storage " * (4 + i)} for i in range(6)]
    docs.append({"id": "copy", "text": docs[5]["text"]})
    fs.pipe(f"{bucket}/corpus/part-0.jsonl.gz",
            gzip.compress("".join(json.dumps(d) + "\n" for d in docs[:4]).encode()))
    fs.pipe(f"{bucket}/corpus/part-1.jsonl", "".join(json.dumps(d) + "\n" for d in docs[4:]).encode())
    fs.pipe(f"{bucket}/corpus/notes.txt", b"a plain text shard")
    fs.pipe(f"{bucket}/elsewhere/ignored.jsonl", b'{"text": "not matched by the glob"}\n')
    out = f"s3://{bucket}/audit"
    record = run(["--input", f"s3://{bucket}/corpus/*", "--output", out, "--model", tiny_byte_model,
                  "--id-field", "id", "--chunk-bytes", "64", "--coding-rows", "8", "--verify-fraction", "1",
                  "--quiet"])
    assert record["counts"]["shards"] == 3 and record["counts"]["documents"] == 7 + 1
    assert record["counts"]["reconciled"] and record["coding"]["verified"] == record["counts"]["chunks"]
    assert record["coding"]["verification_failed"] == 0
    listing = fs.find(f"{bucket}/audit")
    for folder in ("chunks", "documents", "shards", "payloads", "duplicates"):
        assert any(f"/audit/{folder}/" in p and p.endswith(".parquet") for p in listing), folder
    assert f"{bucket}/audit/run.json" in listing and f"{bucket}/audit/report.html" in listing
    assert not any(".tmp" in p or "/_staging" in p for p in listing)  # staged payloads removed once committed
    documents = ds.dataset(f"{bucket}/audit/documents", filesystem=fs, format="parquet").to_table().to_pylist()
    ids = sorted(d["doc_id"] for d in documents)
    assert ids[:7] == sorted(d["id"] for d in docs) and ids[7].endswith("corpus/notes.txt#0"), ids
    dups = ds.dataset(f"{bucket}/audit/duplicates", filesystem=fs, format="parquet").to_table().to_pylist()
    assert {(r["doc_id"], r["keep"]) for r in dups} == {("d5", True), ("copy", False)}
    # Payloads on S3 decode back to the documents.
    assert decode(["--payloads", f"{out}/payloads", "--output", str(tmp_path), "--format", "jsonl",
                   "--model", tiny_byte_model]) == 0
    lines = [json.loads(line) for line in (tmp_path / "decoded.jsonl").read_text().splitlines()]
    decoded = {x["doc_id"]: x["text"] for x in lines}
    for d in docs:
        assert decoded[d["id"]] == d["text"]
    # An incremental run on S3 reads the commit markers back (in batches) and keeps every shard.
    again = run(["--input", f"s3://{bucket}/corpus/*", "--output", out, "--model", tiny_byte_model,
                 "--id-field", "id", "--chunk-bytes", "64", "--coding-rows", "8", "--verify-fraction", "1",
                 "--quiet", "--incremental"])
    assert again["counts"]["shards_kept_from_earlier_runs"] == 3 and again["counts"]["documents"] == 8
    dups = ds.dataset(f"{bucket}/audit/duplicates", filesystem=fs, format="parquet").to_table().to_pylist()
    assert {(r["doc_id"], r["keep"]) for r in dups} == {("d5", True), ("copy", False)}
