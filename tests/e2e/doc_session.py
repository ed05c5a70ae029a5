"""One bash session that runs a page's command blocks in order, as a reader's terminal would
(tests/e2e/test_docs_executed.py; the convention is in tests/docblocks.py).

Each block is written to a file and ``source``d by the same bash, with stdin from /dev/null and its
output (stdout and stderr, background jobs included) in a file of its own, so variables, ``$!`` and
jobs carry over from block to block. Ordinary blocks run under ``set -e -o pipefail``: the first
failing command ends the session, and the result says which block and what it printed. The session
runs in a process group of its own, with TMPDIR in a directory of its own; ``close`` kills that group
(the processes this session started) and nothing else.
"""

from __future__ import annotations

import os
import signal
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass

from tests.docblocks import Block


@dataclass(frozen=True)
class BlockRun:
    block: Block
    returncode: int | None   # None: still running at the timeout
    output: str
    seconds: float
    session_ended: bool      # set -e ended the shell (a command failed)


class DocSession:
    def __init__(self, workdir: str, cwd: str, env: dict[str, str]) -> None:
        self.workdir = workdir
        # the page's mktemp files: outside pytest's 0700 tmp_path, since the page hands some of them to
        # other users (PostgreSQL's data directory); removed by remove_files
        self.tmp = tempfile.mkdtemp(prefix="tcpmesh-docs-")
        os.chmod(self.tmp, 0o755)
        self.log = open(os.path.join(workdir, "bash.log"), "w")
        self.proc = subprocess.Popen(["bash", "--noprofile", "--norc"], cwd=cwd, env={**env, "TMPDIR": self.tmp},
                                     stdin=subprocess.PIPE, stdout=self.log, stderr=subprocess.STDOUT,
                                     text=True, start_new_session=True)
        self.count = 0

    def run(self, block: Block, timeout: float) -> BlockRun:
        self.count += 1
        script = os.path.join(self.workdir, f"block{self.count}.sh")
        out = os.path.join(self.workdir, f"block{self.count}.out")
        done = os.path.join(self.workdir, f"block{self.count}.rc")
        with open(script, "w") as f:
            f.write(block.text)
        mode = "set +e +o pipefail" if block.must_fail else "set -e -o pipefail"
        started = time.monotonic()
        self.proc.stdin.write(f"{mode}\nsource {script} < /dev/null > {out} 2>&1\n"
                              f"echo $? > {done}.tmp; set +e; mv {done}.tmp {done}\n")
        self.proc.stdin.flush()
        returncode, ended = None, False
        deadline = started + timeout
        while time.monotonic() < deadline:
            if os.path.exists(done):
                with open(done) as f:
                    returncode = int(f.read().strip())
                break
            if self.proc.poll() is not None:
                returncode, ended = self.proc.returncode, True
                break
            time.sleep(0.1)
        with open(out, errors="replace") as f:
            output = f.read()
        return BlockRun(block, returncode, output, time.monotonic() - started, ended)

    def close(self) -> None:
        """Kill the session's process group (the shell and every job it started), then reap the shell."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            self.proc.stdin.close()
        except OSError:
            pass
        self.proc.wait(timeout=10)
        self.log.close()

    def remove_files(self) -> None:
        """Remove the page's temporary files (after its processes are gone)."""
        shutil.rmtree(self.tmp, ignore_errors=True)
