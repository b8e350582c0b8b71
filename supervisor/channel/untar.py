"""Extracting a tar the sandbox sent onto the host (a GET), without trusting `os.path.realpath`.

tarfile's `data` filter decides with `os.path.realpath`, which before Python 3.11.13 / 3.12.11
stops resolving once a path passes PATH_MAX (CVE-2025-4517): a chain of long symlinks makes a
link out look inside, and a hard link or a file through it then writes outside the destination.
The host's Python is whatever the operator has, so here the filter's verdict is only the first
check. Then no member is written through a symlink: every component of its path and of a hard
link's target is checked with `lstat`, so each path means what it says; symlinks are made only
after every other member, and one is kept only if its target, walked component by component,
stays inside the destination and passes through no other symlink (its last component may be a
symlink kept by the same rule). Hard links are made here (to regular files only), never by
tarfile, whose fallback would extract the unfiltered target member in their place.

What the sandbox can make the host hold is bounded too: an extended header (pax, GNU long
name) is read whole into memory by tarfile, so one past MAX_HEADER_BYTES ends the extraction;
and the members read are not kept (tarfile keeps every TarInfo of a stream it reads).
"""

from __future__ import annotations

import os
import stat
import tarfile
from typing import Any

from agent_image.channel._tar import _TRUSTED, MAX_SKIPPED, Refused, check_member

MAX_HEADER_BYTES = 1 << 20
_EXTENDED = (
    tarfile.XHDTYPE,
    tarfile.XGLTYPE,
    tarfile.SOLARIS_XHDTYPE,
    tarfile.GNUTYPE_LONGNAME,
    tarfile.GNUTYPE_LONGLINK,
)


class _BoundedInfo(tarfile.TarInfo):
    """A TarInfo that refuses an extended header too large to hold in memory."""

    def _proc_member(self, tarfile_: tarfile.TarFile) -> tarfile.TarInfo:
        if self.type in _EXTENDED and self.size > MAX_HEADER_BYTES:
            raise tarfile.SubsequentHeaderError(  # type: ignore[attr-defined]  # next() makes it a ReadError
                f"an extended header of {self.size} bytes (at most {MAX_HEADER_BYTES})"
            )
        return super()._proc_member(tarfile_)  # type: ignore[misc,no-any-return]


def _parts(rel: str) -> list[str]:
    return [p for p in rel.split("/") if p not in ("", ".")]


def _walk(dest: str, start: list[str], rel: str, *, final_link_ok: bool) -> list[str]:
    """The components of `rel` walked from `dest/start`; refused when it leaves `dest` or
    passes through a symlink (the last component may be one when `final_link_ok`)."""
    at = list(start)
    comps = _parts(rel)
    for i, comp in enumerate(comps):
        if comp == "..":
            if not at:
                raise Refused("outside the destination")
            at.pop()
            continue
        at.append(comp)
        try:
            st = os.lstat(os.path.join(dest, *at))
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise Refused(f"cannot be checked: {exc.strerror}") from None
        if stat.S_ISLNK(st.st_mode) and not (final_link_ok and i == len(comps) - 1):
            raise Refused("through a symlink")
    return at


def _refuse(doc: dict[str, Any], name: str, why: str) -> None:
    doc["refused"] += 1
    if len(doc["skipped"]) < MAX_SKIPPED:
        doc["skipped"].append(f"{name}: {why}")


class TooManyMembers(tarfile.TarError):
    """The tar has more members than the caller allows (checked before each is made)."""


def extract_untrusted(reader: Any, dest: str, max_members: int | None = None) -> dict[str, Any]:
    """Extract the tar read from `reader` (`read(n)`, `count`) into `dest` (see the module).

    Raises:
        TooManyMembers: past `max_members` members (refused ones count too): the host's inodes
            are bounded as its bytes are, before they are spent.

    Returns ok, bytes, refused and the first skipped members (as the hub's DONE does).
    """
    os.makedirs(dest, exist_ok=True)
    dest = os.path.realpath(dest)
    doc: dict[str, Any] = {"ok": True, "skipped": [], "refused": 0}
    links: list[tarfile.TarInfo] = []
    with tarfile.open(fileobj=reader, mode="r|*", tarinfo=_BoundedInfo) as tf:
        seen = 0
        while (member := tf.next()) is not None:
            tf.members.clear()  # type: ignore[attr-defined]  # what a stream has read (kept for nothing here)
            seen += 1
            if max_members is not None and seen > max_members:
                raise TooManyMembers(f"more than {max_members} entries")
            try:
                if member.sparse is not None:
                    # Its apparent size is the tar's to choose (a 1 TiB file from 10 KiB); the
                    # hub's tarfile writes none.
                    raise Refused("a sparse file")
                safe = check_member(member, dest)
                at = _walk(dest, [], safe.name, final_link_ok=False)
                if not at:
                    raise Refused("the destination itself")
                if safe.issym():
                    links.append(safe)
                    continue
                path = os.path.join(dest, *at)
                if safe.isdir():
                    os.makedirs(path, exist_ok=True)
                    continue
                if safe.islnk():
                    src = os.path.join(dest, *_walk(dest, [], safe.linkname, final_link_ok=False))
                    if not stat.S_ISREG(os.lstat(src).st_mode):
                        raise Refused("hard link to something that is not a regular file here")
                    os.makedirs(os.path.dirname(path), exist_ok=True)
                    if os.path.lexists(path) and not os.path.isdir(path):
                        os.unlink(path)
                    os.link(src, path, follow_symlinks=False)
                    continue
                safe.name = "/".join(at)
                tf.extract(safe, dest, set_attrs=True, **_TRUSTED)
            except Refused as exc:
                _refuse(doc, member.name, str(exc))
            except FileNotFoundError:
                _refuse(doc, member.name, "hard link to a missing member")
    made: list[tuple[tarfile.TarInfo, list[str]]] = []
    for link in links:
        try:
            at = _walk(dest, [], link.name, final_link_ok=False)
            if os.path.lexists(os.path.join(dest, *at)):
                raise Refused("already exists")
            os.makedirs(os.path.join(dest, *at[:-1]), exist_ok=True)
            os.symlink(link.linkname, os.path.join(dest, *at))
            made.append((link, at))
        except Refused as exc:
            _refuse(doc, link.name, str(exc))
    # With every link in place, each one's target is walked as the kernel would resolve it.
    for link, at in made:
        try:
            if os.path.isabs(link.linkname):
                raise Refused("link to an absolute path")
            _walk(dest, at[:-1], link.linkname, final_link_ok=True)
        except Refused as exc:
            os.unlink(os.path.join(dest, *at))
            _refuse(doc, link.name, f"link outside the destination ({exc})")
    doc["bytes"] = reader.count
    return doc
