"""Tune's storage path never holds a torn file, whatever moment the driver dies at."""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import time

from sweeper.storage import atomic_local_fs


def test_a_file_appears_only_complete(tmp_path):
    fs = pickle.loads(pickle.dumps(atomic_local_fs()))  # Tune ships it to each trial
    target = tmp_path / "experiment_state.json"
    target.write_text("old")
    out = fs.open_output_stream(str(target))
    out.write(b"new-but-not-yet-closed")
    assert target.read_text() == "old"  # readers see the previous complete version
    out.close()
    assert target.read_text() == "new-but-not-yet-closed"
    assert os.listdir(tmp_path) == ["experiment_state.json"]  # no temporary left


def test_a_writer_killed_mid_copy_leaves_the_previous_version(tmp_path):
    src = tmp_path / "staging"
    src.mkdir()
    (src / "searcher-state.pkl").write_bytes(pickle.dumps(list(range(5_000_000))))
    dst = tmp_path / "storage"
    dst.mkdir()
    (dst / "searcher-state.pkl").write_bytes(pickle.dumps("previous snapshot"))
    done = tmp_path / "copies"  # one byte per finished copy
    code = (
        "import sys, pyarrow.fs as f; from sweeper.storage import atomic_local_fs\n"
        "while True:\n"
        "    f.copy_files(sys.argv[1], sys.argv[2], "
        "destination_filesystem=atomic_local_fs(), chunk_size=1 << 16)\n"
        "    open(sys.argv[3], 'ab').write(b'.')\n"
    )
    for _ in range(3):
        done.unlink(missing_ok=True)
        proc = subprocess.Popen([sys.executable, "-c", code, str(src), str(dst), str(done)])
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # a copy has landed and the next is under way
            if done.exists() and any(p.name.startswith(".") for p in dst.iterdir()):
                break
            time.sleep(0.002)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert done.exists(), "no copy finished in time"
        # In place, the kill would have left a truncated pickle; here it is the last whole one.
        assert pickle.loads((dst / "searcher-state.pkl").read_bytes()) == list(range(5_000_000))
