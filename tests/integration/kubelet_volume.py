"""A ConfigMap volume as the kubelet writes it (its AtomicWriter), for the agent's config-watch tests.

``<dir>/config.yaml -> ..data/config.yaml``, ``..data -> ..<timestamp>``: an update writes every key into
a new ``..<timestamp>`` directory, points a new ``..data_tmp`` link at it, renames that over ``..data``
(the one atomic step: a reader sees the old or the new version, never a mix), then removes the old
directory. The user-visible link never changes, so a watcher that stats the path without following the
links sees nothing. No root needed; plain files in the test's directory.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path


class ConfigMapVolume:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)

    def write(self, data: dict[str, str]) -> None:
        """One kubelet sync of the ConfigMap's ``data`` (key → file content)."""
        stamp = time.strftime("..%Y_%m_%d_%H_%M_%S.", time.gmtime())
        new = Path(tempfile.mkdtemp(prefix=stamp, dir=self.directory))
        new.chmod(0o755)
        for key, text in data.items():
            (new / key).write_text(text)
            (new / key).chmod(0o644)
        data_link = self.directory / "..data"
        old = os.readlink(data_link) if data_link.is_symlink() else None
        tmp_link = self.directory / "..data_tmp"
        tmp_link.unlink(missing_ok=True)
        tmp_link.symlink_to(new.name)
        os.rename(tmp_link, data_link)
        for key in data:
            visible = self.directory / key
            if not visible.is_symlink():
                visible.symlink_to(Path("..data") / key)
        if old is not None:
            shutil.rmtree(self.directory / old)

    def writer(self, key: str = "config.yaml"):
        """For ``in_process_agent(config_writer=…)``: the first sync, and the path the pod reads."""
        def write(text: str) -> Path:
            self.write({key: text})
            return self.directory / key
        return write
