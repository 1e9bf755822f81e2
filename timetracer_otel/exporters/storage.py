"""Where cassettes go: a local directory (atomic writes). S3 plugs in behind the same API."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from timetracer_otel.cassette import atomic_write
from timetracer_otel.errors import CassetteError


class Storage(Protocol):
    def write(self, relpath: str, data: bytes) -> str:
        """Store ``data`` at ``relpath`` atomically; return where it went."""
        ...

    def check(self) -> None:
        """Raise :class:`CassetteError` if nothing can be written here."""
        ...


class LocalStorage:
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def write(self, relpath: str, data: bytes) -> str:
        return str(atomic_write(self.root / relpath, data))

    def check(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            probe = self.root / ".timetracer-write-check"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise CassetteError(
                f"cannot write cassettes to {self.root} ({exc.strerror}); "
                "choose a writable directory with --dir or TIMETRACER_DIR."
            ) from None

    def __repr__(self) -> str:
        return f"LocalStorage({str(self.root)!r})"


def storage_for(location: str | Path) -> Storage:
    """The storage for a ``--dir`` / ``TIMETRACER_DIR`` value."""
    text = str(location)
    if text.startswith("s3://"):
        from timetracer_otel.exporters.s3 import S3Storage  # type: ignore[import-not-found,import-untyped,unused-ignore]

        return S3Storage(text)  # type: ignore[no-any-return,unused-ignore]
    return LocalStorage(text)
