"""``feedbackcam doctor``: check an app's store and repair what can be repaired safely.

Checks that the database opens, that the current version's checkpoint exists and has the
SHA-256 recorded for it, that every promoted version could be activated, that every feedback
item's files exist, and that no checkpoint file is unknown to the database. With ``repair`` it
makes the last good version current, records unfinished candidates as interrupted, moves
unknown checkpoints to ``checkpoints/orphans/`` and removes half-written temp files. Nothing is
deleted that a row refers to, and no feedback row is changed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import select

from .db import Item, Version, connect, current_version, set_current, store_exists
from .lease import DbLease
from .settings import Settings
from .startup import last_good_version, verify_file
from .store import Store
from .worker import mark_interrupted


@dataclass(frozen=True)
class Finding:
    """One thing found: ``problem`` (None when all is well), and what ``repair`` did about it."""

    subject: str
    problem: str | None = None
    repaired: str | None = None
    note: bool = False  # worth knowing, harmless as it is (e.g. a version that cannot run)

    @property
    def open(self) -> bool:
        return self.problem is not None and self.repaired is None and not self.note

    def line(self) -> str:
        if self.problem is None:
            return f"ok        {self.subject}"
        if self.note:
            return f"note      {self.subject}: {self.problem}"
        if self.repaired is None:
            return f"PROBLEM   {self.subject}: {self.problem}"
        return f"repaired  {self.subject}: {self.problem}; {self.repaired}"


def examine(settings: Settings, *, repair: bool = False) -> list[Finding]:
    """Check the store of ``settings`` (and repair it with ``repair``); a list of findings."""
    try:
        engine, sessions = connect(settings.database_url)
    except ValueError as err:
        return [Finding("database", str(err))]
    store = Store(settings.data_dir)
    findings = [Finding(f"database {engine.url.render_as_string(hide_password=True)}")]
    try:
        findings += _versions(sessions, store, repair)
        findings += _items(sessions, store)
        findings += _files(sessions, store, repair)
    finally:
        engine.dispose()
    return findings


def _versions(sessions, store: Store, repair: bool) -> list[Finding]:
    found = []
    with sessions() as session:
        unfinished = session.scalars(select(Version.id).where(Version.status == "candidate")).all()
    if unfinished and DbLease(sessions).held_by_other():
        problem = f"update candidate(s) {list(unfinished)} running in a live app: left alone"
        found.append(Finding("updates", problem, note=True))
    elif unfinished:
        problem = f"unfinished update candidate(s) {list(unfinished)}"
        done = None
        if repair:
            mark_interrupted(sessions)
            done = "recorded as interrupted (their feedback stays pending)"
        found.append(Finding("updates", problem, done))
    with sessions() as session:
        current = current_version(session)
        problem = None
        if current is None:
            if session.scalar(select(Version.id).limit(1)) is not None:
                problem = "no current version"
        else:
            try:
                verify_file(store, current)
            except ValueError as err:
                problem = str(err)
        if problem is None:
            subject = "current version" + ("" if current is None else f" {current.id}")
            found.append(Finding(subject))
        else:
            good = last_good_version(session, store, exclude=current.id if current else None)
            done = None
            if repair and good is not None:
                set_current(session, session.get(Version, good))
                session.commit()
                done = f"version {good}, the last good one, is current now"
            elif good is None:
                problem += "; no promoted version has a good checkpoint to fall back to"
            found.append(Finding("current version", problem, done))
        promoted = session.scalars(select(Version).where(Version.status == "promoted")).all()
        for version in promoted:
            if current is not None and version.id == current.id:
                continue
            try:
                verify_file(store, version)
            except ValueError as err:
                problem = f"cannot be activated (it is refused if tried): {err}"
                found.append(Finding(f"version {version.id}", problem, note=True))
    return found


def _items(sessions, store: Store) -> list[Finding]:
    with sessions() as session:
        rows = session.execute(
            select(Item.id, Item.image_path, Item.mask_path, Item.ignore_mask_path)
        ).all()
    missing = [
        item_id
        for item_id, *paths in rows
        if any(path and not store.absolute(path).is_file() for path in paths)
    ]
    if not missing:
        return [Finding(f"files of {len(rows)} feedback item(s)")]
    return [Finding("feedback", f"item(s) {missing[:20]} lack their image or mask file")]


def _files(sessions, store: Store, repair: bool) -> list[Finding]:
    found = []
    folder = store.root / "checkpoints"
    with sessions() as session:
        known = {
            store.absolute(p).resolve()
            for p in session.scalars(select(Version.path).where(Version.path.is_not(None)))
        }
    areas = ("images", "masks", "originals", "checkpoints")
    temps = sorted(p for area in areas for p in _temps(store, area))
    if temps:
        done = None
        if repair:
            for path in temps:
                path.unlink(missing_ok=True)
            done = "removed"
        found.append(Finding("temp files", f"{len(temps)} half-written file(s)", done))
    orphans = sorted(p for p in folder.glob("*.pt") if p.is_file() and p.resolve() not in known)
    if orphans:
        done = None
        if repair:
            (folder / "orphans").mkdir(exist_ok=True)
            for path in orphans:
                path.rename(folder / "orphans" / path.name)
            done = f"moved to {folder / 'orphans'}"
        names = ", ".join(p.name for p in orphans[:5])
        problem = f"{len(orphans)} unknown to the database: {names}"
        found.append(Finding("checkpoints", problem, done))
    return found


def _temps(store: Store, area: str) -> list[Path]:
    return [p for p in (store.root / area).glob(".*.tmp") if p.is_file()]


def doctor(args) -> int:
    """The CLI command: print each finding; exit 0 when nothing is left to repair, else 1."""
    settings = Settings(data_dir=args.data_dir, db_url=args.db)
    if not settings.data_dir.is_dir():
        raise ValueError(f"--data-dir {settings.data_dir}: no such folder")
    if not store_exists(settings):  # checked before connect, which would create the file
        raise ValueError(
            f"--data-dir {settings.data_dir}: no feedbackcam store there (no feedbackcam.db); "
            "is the path right? ('feedbackcam serve --data-dir DIR' creates a store)"
        )
    findings = examine(settings, repair=args.repair)
    for finding in findings:
        print(finding.line())
    left = [f for f in findings if f.open]
    if left and not args.repair:
        print(f"{len(left)} problem(s); 'feedbackcam doctor --repair' repairs what it safely can")
    return 1 if left else 0
