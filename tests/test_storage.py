"""Tests for mecpe.storage: local and S3 (a real moto server on loopback) I/O, atomic writes, safe keys."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re

import boto3
import pytest

from mecpe import readers, splits, storage

from _tiny import TRAIN_FILE

SAFE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


def _tree(root, files):
    for rel, text in files.items():
        path = os.path.join(root, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as fh:
            fh.write(text)


def test_local_round_trip_and_listing(tmp_path):
    root = str(tmp_path / "root")
    uri = storage.join(root, "deep", "er", "x.json")
    storage.write_json(uri, {"b": 1, "a": ["ü"]}, indent=2)
    assert storage.read_json(uri) == {"b": 1, "a": ["ü"]}
    assert storage.read_bytes(uri) == '{\n  "b": 1,\n  "a": [\n    "ü"\n  ]\n}\n'.encode()
    assert storage.sha256(uri) == hashlib.sha256(storage.read_bytes(uri)).hexdigest()
    assert storage.exists(uri) and storage.exists("file://" + uri) and not storage.exists(uri + ".no")

    _tree(root, {"a.jsonl": "", "b.txt": "", ".hidden.json": "", "_tmp/c.json": "", "sub/.d/e.json": "",
                 "sub/f.JSON": ""})
    assert storage.list_files(root) == [os.path.join(root, p) for p in ("a.jsonl", "deep/er/x.json", "sub/f.JSON")]
    assert storage.list_files(root, suffixes=None)[1] == os.path.join(root, "b.txt")
    assert storage.list_files(uri) == [uri]
    with pytest.raises(FileNotFoundError):
        storage.list_files(os.path.join(root, "nothing"))

    storage.delete(uri)
    storage.delete(uri)  # missing is fine
    storage.delete_dir(os.path.join(root, "sub"))
    storage.delete_dir(os.path.join(root, "sub"))
    assert not storage.exists(uri) and not os.path.exists(os.path.join(root, "sub"))


def test_local_writes_are_atomic(tmp_path, monkeypatch):
    target = tmp_path / "out.json"
    for i in range(20):
        storage.write_bytes(str(target), b"x" * i)
    assert target.read_bytes() == b"x" * 19
    assert os.listdir(tmp_path) == ["out.json"]  # no temp files left

    def crash(src, dst):
        raise OSError("disk gone")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk gone"):
        storage.write_bytes(str(target), b"new content")
    assert target.read_bytes() == b"x" * 19 and os.listdir(tmp_path) == ["out.json"]


def test_local_dir_copies(tmp_path):
    _tree(tmp_path / "src", {"config.json": "{}", "w/model.safetensors": "w" * 3_000_000, ".gitattributes": "*"})
    copied = storage.upload_dir(str(tmp_path / "src"), str(tmp_path / "dst"))
    assert copied == [".gitattributes", "config.json", "w/model.safetensors"]
    assert (tmp_path / "dst" / "w" / "model.safetensors").read_text() == "w" * 3_000_000


def test_safe_key_on_hostile_ids():
    hostile = [1374, "1374", "../../etc/passwd", "..", ".", "/", "a/b", "a_b", "a b", "x" * 5000, "x" * 5001,
               "", " ", "-", "_", "\n", "ü", "üü", "日本語", "a\x00b", "\udc80", "dia1utt1.mp4", "abc\n",
               "S01E01:00:01", "a" * 100, "a" * 101]
    keys = [storage.safe_key(i) for i in hostile]
    assert all(SAFE.fullmatch(k) for k in keys), keys
    assert len(set(keys)) == len(hostile) - 1  # only 1374 and "1374" coincide (the same conversation id)
    assert storage.safe_key(1374) == "1374" and storage.safe_key("dia1utt1.mp4") == "dia1utt1.mp4"
    assert storage.safe_key("../../etc/passwd") == storage.safe_key("../../etc/passwd")
    assert "/" not in storage.safe_key("a/b") and not storage.safe_key("..").startswith(".")


def test_endpoint_and_region_from_environment(monkeypatch):
    for key in ("MECPE_S3_ENDPOINT", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "AWS_REGION", "AWS_DEFAULT_REGION"):
        monkeypatch.delenv(key, raising=False)

    def options(uri, settings=None):
        fs, path = storage.get_filesystem(uri, settings)
        return fs.__reduce__()[1][0], path

    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://10.0.0.1:9000")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:9001/")
    opts, path = options("s3://bkt/a/b/")
    assert (opts["endpoint_override"], opts["scheme"], opts["region"]) == ("127.0.0.1:9001", "http", "us-east-1")
    assert path == "bkt/a/b"
    monkeypatch.setenv("MECPE_S3_ENDPOINT", "https://minio.local")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-1")
    opts, _ = options("s3://bkt/k")
    assert (opts["endpoint_override"], opts["scheme"], opts["region"]) == ("minio.local", "https", "eu-west-1")
    opts, _ = options("s3://bkt/k", storage.S3Settings(endpoint="http://h:1", region="ap-south-1"))
    assert (opts["endpoint_override"], opts["scheme"], opts["region"]) == ("h:1", "http", "ap-south-1")
    # the config wins over the environment; settings_from resolves, using/configure apply them
    from mecpe.config import StorageConfig

    explicit = storage.settings_from(StorageConfig(s3_endpoint="http://cfg:2", s3_region="ca-central-1"))
    assert explicit == storage.S3Settings("http://cfg:2", "ca-central-1")
    assert storage.settings_from(StorageConfig()) == storage.S3Settings("https://minio.local", "eu-west-1")
    with storage.using(explicit):
        opts, _ = options("s3://bkt/k")
        assert (opts["endpoint_override"], opts["region"]) == ("cfg:2", "ca-central-1")
    opts, _ = options("s3://bkt/k")  # restored: the environment again
    assert opts["endpoint_override"] == "minio.local"
    assert storage.get_filesystem("s3://x/y")[0] is storage.get_filesystem("s3://z")[0]  # cached


def test_pickled_s3_filesystem_carries_no_secret(s3_server, monkeypatch):
    fs, _ = storage.get_filesystem(f"s3://{s3_server['bucket']}/k")
    blob = pickle.dumps(fs)
    assert b"testing" not in blob  # the secret key of the fixture
    uri = f"s3://{s3_server['bucket']}/pickle/probe.txt"
    storage.write_bytes(uri, b"probe")
    clone = pickle.loads(blob)  # rebuilt from the environment, works the same
    with clone.open_input_stream(f"{s3_server['bucket']}/pickle/probe.txt") as fh:
        assert fh.read() == b"probe"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "mecpe-very-secret-value")
    fresh, _ = storage.get_filesystem("s3://b/k", storage.S3Settings(endpoint="http://127.0.0.1:1"))
    assert b"mecpe-very-secret-value" not in pickle.dumps(fresh)


def test_s3_round_trip(s3_server, tmp_path):
    base = f"s3://{s3_server['bucket']}/rt"
    storage.write_json(storage.join(base, "a", "x.json"), [1, "ü"])
    assert storage.read_json(base + "/a/x.json") == [1, "ü"]
    storage.write_bytes(base + "/a/x.json", b"[2]")  # overwrite
    assert storage.read_bytes(base + "/a/x.json") == b"[2]"
    assert storage.sha256(base + "/a/x.json") == hashlib.sha256(b"[2]").hexdigest()
    storage.write_bytes(base + "/b/y.jsonl", b"")
    storage.write_bytes(base + "/_tmp/z.json", b"")
    storage.write_bytes(base + "/b/z.bin", b"")
    assert storage.list_files(base) == [base + "/a/x.json", base + "/b/y.jsonl"]
    assert storage.list_files(base + "/a/x.json") == [base + "/a/x.json"]
    assert storage.exists(base + "/a") and not storage.exists(base + "/nope")

    s3 = boto3.client("s3", endpoint_url=s3_server["endpoint"], region_name="us-east-1")
    assert s3.get_object(Bucket=s3_server["bucket"], Key="rt/a/x.json")["Body"].read() == b"[2]"

    _tree(tmp_path / "ckpt", {"adapter_config.json": "{}", "sub/weights.bin": "w" * 100_000})
    assert storage.upload_dir(str(tmp_path / "ckpt"), base + "/ckpt") == ["adapter_config.json", "sub/weights.bin"]
    storage.download_dir(base + "/ckpt", str(tmp_path / "back"))
    assert (tmp_path / "back" / "sub" / "weights.bin").read_text() == "w" * 100_000

    storage.delete(base + "/a/x.json")
    storage.delete(base + "/a/x.json")
    storage.delete_dir(base)
    storage.delete_dir(base)
    assert not storage.exists(base + "/b/y.jsonl")


def test_prepare_reads_and_writes_s3(s3_server, tmp_path, data_dir):
    """Inputs under an S3 prefix, outputs to S3: same bytes as a local run of the same inputs."""
    bucket = s3_server["bucket"]
    gold = data_dir / "NUSTM_SemEval-2024_ECAC" / "data" / "Subtask_2_test.json"
    test = f"s3://{bucket}/in/Subtask_2_test.json"
    storage.write_bytes(test, gold.read_bytes())
    storage.write_bytes(f"s3://{bucket}/in/0-extra.jsonl", json.dumps(
        {"conversation_ID": 1375, "conversation": [{"utterance_ID": 1, "text": "dup", "speaker": "A"}]}).encode())
    train = str(TRAIN_FILE)
    out = f"s3://{bucket}/prepared"
    result = splits.prepare(train, test, out, split="reference", val_fraction=0.1, seed=42)
    assert result.splits["test"]["conversations"] == 341 and result.rejects == 0
    local = tmp_path / "local"
    splits.prepare(train, str(gold), str(local), split="reference", val_fraction=0.1, seed=42)
    names = ["manifest.json", "reference_test.json", "rejects.jsonl", "test.json", "train.json", "val.json"]
    assert [u.rsplit("/", 1)[1] for u in storage.list_files(out, suffixes=None)] == names
    for name in names[1:]:
        assert storage.read_bytes(f"{out}/{name}") == (local / name).read_bytes(), name
    manifest = json.loads(storage.read_bytes(f"{out}/manifest.json"))
    assert manifest["inputs"]["test"] == {test: storage.sha256(str(gold))}

    whole_prefix = readers.read_conversations(f"s3://{bucket}/in")  # files in sorted order: 0-extra.jsonl first
    assert len(whole_prefix.conversations) == 341 and whole_prefix.file_errors == []
    (dup,) = whole_prefix.rejects
    assert dup.source == test and dup.conversation_id == "1375" and f"s3://{bucket}/in/0-extra.jsonl" in dup.reason
