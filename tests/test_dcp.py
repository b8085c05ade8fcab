"""DCP manifests (ledger/_dcp.py, docs/FORMAT.md §11.1) on real files: the known answer, what a
reader refuses, what a comparison names. The distributed run itself is in tests/test_distributed.py."""

from __future__ import annotations

import hashlib
import os

import pytest

from ledger._dcp import check_files, compare, manifest_digest, rank_files
from ledger._schema import CheckpointBody
from ledger.errors import FormatError


def test_known_answer():
    files = {".metadata": {"size": 3, "sha256": hashlib.sha256(b"abc").digest(), "rank": 0},
             "__1_0.distcp": {"size": 0, "sha256": hashlib.sha256(b"").digest(), "rank": 1}}
    assert manifest_digest(files).hex() == "db09bd429775d14125cb209f2d00a5c8b1880a7cbd856af08987f282fb37475d"


def write_dcp(path):
    path.mkdir()
    (path / ".metadata").write_bytes(b"meta")
    (path / "__0_0.distcp").write_bytes(b"rank zero" * 100)
    (path / "__1_0.distcp").write_bytes(b"rank one" * 100)


def test_each_rank_vouches_for_its_own_files(tmp_path):
    write_dcp(tmp_path / "d")
    assert set(rank_files(tmp_path / "d", 1, coordinator=False)) == {"__1_0.distcp"}
    assert set(rank_files(tmp_path / "d", 0, coordinator=True)) == {".metadata", "__0_0.distcp"}


def test_compare_names_what_changed(tmp_path):
    write_dcp(tmp_path / "d")
    files = {**rank_files(tmp_path / "d", 0, coordinator=True), **rank_files(tmp_path / "d", 1, coordinator=False)}
    assert compare(tmp_path / "d", files) == []
    (tmp_path / "d" / "__1_0.distcp").write_bytes(b"rank one" * 99 + b"rank 0ne")
    (tmp_path / "d" / "__2_0.distcp").write_bytes(b"extra")
    os.remove(tmp_path / "d" / ".metadata")
    (tmp_path / "d" / "__0_0.distcp").write_bytes(b"rank zero" * 101)
    assert compare(tmp_path / "d", files) == [".metadata is missing", "__0_0.distcp differs (written by rank 0)",
                                              "__1_0.distcp differs (written by rank 1)",
                                              "1 file the manifest does not list"]


def test_symlink_and_fifo_are_not_hashed(tmp_path):
    write_dcp(tmp_path / "d")
    files = rank_files(tmp_path / "d", 0, coordinator=True)
    os.remove(tmp_path / "d" / "__0_0.distcp")
    os.symlink(tmp_path / "d" / ".metadata", tmp_path / "d" / "__0_0.distcp")
    assert compare(tmp_path / "d", files)[0].startswith("__0_0.distcp is unreadable")
    os.remove(tmp_path / "d" / "__0_0.distcp")
    os.mkfifo(tmp_path / "d" / "__0_0.distcp")
    assert compare(tmp_path / "d", files)[0].startswith("__0_0.distcp is unreadable")  # returns, never blocks


@pytest.mark.parametrize("files", [
    {}, {"../x": {"size": 1, "sha256": bytes(32), "rank": 0}}, {"a/b": {"size": 1, "sha256": bytes(32), "rank": 0}},
    {"x": {"size": -1, "sha256": bytes(32), "rank": 0}}, {"x": {"size": 1, "sha256": bytes(31), "rank": 0}},
    {"x": {"size": 1, "sha256": bytes(32)}}, {"x": {"size": True, "sha256": bytes(32), "rank": 0}},
])
def test_reader_refuses_crafted_manifests(files):
    with pytest.raises(FormatError):
        check_files(files)


def test_entry_round_trip_and_pinned_digest():
    files = {".metadata": {"size": 3, "sha256": hashlib.sha256(b"abc").digest(), "rank": 0}}
    body = CheckpointBody.dcp(files, "/runs/dcp-3").to_body()
    assert CheckpointBody.from_body(body).files == files and not CheckpointBody.from_body(body).stored_here
    with pytest.raises(FormatError, match="not the digest of its 'files'"):
        CheckpointBody.from_body({**body, "files": {".metadata": {**files[".metadata"], "size": 4}}})
    with pytest.raises(FormatError, match="'layout'"):
        CheckpointBody.from_body({**body, "layout": "zip"})
    for path in ("/runs/..", "runs/dcp-3"):
        with pytest.raises(FormatError, match="not an absolute path ending in a directory name"):
            CheckpointBody.from_body({**body, "path": path})


@pytest.mark.skipif(not os.path.exists("/proc/self/pagemap"), reason="needs Linux procfs")
def test_an_endless_file_is_not_read_to_its_end():
    """A crafted manifest naming /proc/self/pagemap (size 0 by stat, terabytes by read): one byte is read."""
    from pathlib import Path

    assert compare(Path("/proc/self"), {"pagemap": {"size": 0, "sha256": bytes(32), "rank": 0}}) == \
        ["pagemap differs (written by rank 0)"]


def test_files_layout_covers_subdirectories(tmp_path):
    """Layout "files" (a Trainer checkpoint-N/): every file under the directory, by relative path;
    an added or changed file anywhere is named; symlinks are refused when recording."""
    from ledger._dcp import tree_files

    root = tmp_path / "checkpoint-3"
    (root / "global_step3").mkdir(parents=True)
    (root / "trainer_state.json").write_text("{}")
    (root / "global_step3" / "shard.bin").write_bytes(b"x" * 50)
    files = tree_files(root)
    assert set(files) == {"trainer_state.json", "global_step3/shard.bin"}
    assert check_files(files, nested=True) == files
    with pytest.raises(FormatError):
        check_files(files)  # a DCP manifest is flat
    assert compare(root, files, nested=True) == []
    (root / "global_step3" / "extra.bin").write_bytes(b"y")
    (root / "global_step3" / "shard.bin").write_bytes(b"z" * 50)
    assert compare(root, files, nested=True) == ["global_step3/shard.bin differs (written by rank 0)",
                                                  "1 file the manifest does not list"]
    os.symlink(root / "trainer_state.json", root / "link.json")
    with pytest.raises(FormatError, match="not a regular file or directory"):
        tree_files(root)


@pytest.mark.parametrize("name", ["../x", "a/../b", "a//b", "/abs", "./a", "a/"])
def test_files_layout_refuses_paths_that_leave_the_directory(name):
    with pytest.raises(FormatError):
        check_files({name: {"size": 1, "sha256": bytes(32), "rank": 0}}, nested=True)
