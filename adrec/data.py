"""The six benchmark datasets: registry, lookup, download, safe readers and statistics.

Two file formats (see `shared/datasets/README.md`):
- split pickle (`*.pkl`): `{"train": [[item, ...], ...], "val": [[item], ...], "test": [[item], ...]}`,
  read with an unpickler that cannot import anything, so a pickle cannot run code;
- sequence text (`*.txt`): `user_id item item ...` per line in time order; the reader makes the
  leave-one-out split (last item test, second-to-last validation, the rest training).

Item ids run 1..num_items everywhere; 0 is padding, so 0 is rejected as an item id.

Where data is found: `data_dir` argument > env `ADREC_DATA_DIR` > `shared/datasets` next to the
repository > `~/.cache/adrec`. A registry file missing there is taken from `~/.cache/adrec`, or
downloaded (into the explicit `data_dir` if writable, else `~/.cache/adrec`) and kept only if its
sha256 matches. The download address is `DatasetInfo.url`, or `<base>/<file>` when a base is set by
the `url_base` argument or env `ADREC_DATA_URL_BASE` (a mirror; the tests use a loopback server).
"""
from __future__ import annotations

import copyreg
import dataclasses
import hashlib
import io
import logging
import os
import pickle
import pickletools
import re
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pandas as pd

logger = logging.getLogger(__name__)

Format = Literal["split_pickle", "sequence_text"]
ENV_DATA_DIR = "ADREC_DATA_DIR"
ENV_URL_BASE = "ADREC_DATA_URL_BASE"
# adrec/data.py -> parents[1] is the repository root; shared/ lies beside it (here and in CI). Every
# folder and file the lookup returns has its symlinks resolved, so one file has one name wherever a
# trial record, a stage-1 cache key or a test compares paths, however the folder was reached.
SHARED_DATA_DIR = (Path(__file__).resolve().parents[2] / "shared" / "datasets").resolve()
STATS_COLUMNS = ("dataset", "users", "items", "interactions", "avg_len", "min_len", "max_len")

_ADREC_RAW = "https://raw.githubusercontent.com/Nemo-1024/ADRec/main/datasets/data/{}/dataset.pkl"


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    title: str
    file: str  # file name in the data directory
    format: Format
    sha256: str
    url: str  # the publisher's raw download address
    users: int  # users with a test item (shared/datasets/README.md); the cost estimate scales by it


def _adrec(name: str, title: str, sha256: str, users: int) -> DatasetInfo:
    return DatasetInfo(name, title, f"{name}.pkl", "split_pickle", sha256, _ADREC_RAW.format(name), users)


REGISTRY: dict[str, DatasetInfo] = {
    info.name: info
    for info in (
        _adrec("baby", "Amazon Baby", "bf8f3485f9e36763e07f0234e0ddb479cb023358797615388a36f0d7238cea99", 11_761),
        _adrec("beauty", "Amazon Beauty", "a2f6ca22b3efe2bc5030ef9a7c4f6c928db2086771d58d9a40147e660f574bc1", 10_553),
        _adrec("ml-100k", "MovieLens 100K", "dfc5dfaa7950d1a85af4fd6bb168c38efc8213092a9f72563c6d75ab00cef8d0", 938),
        _adrec("sports", "Amazon Sports and Outdoors", "d2564386d64a5a5c7b57e11d674e388ca917d7444d4bf24d9e2528b36200587d", 22_686),
        _adrec("toys", "Amazon Toys and Games", "54500b03bd7cc15ae54181d25fd8612339f4266b1693c7fea01272d4266df882", 11_268),
        DatasetInfo("yelp", "Yelp (5-core, S3-Rec preprocessing)", "yelp.txt", "sequence_text",
                    "724b219106b81dd2349027da997334ddb6da9fe2f152ad6e0d97a93170f7caed",
                    "https://raw.githubusercontent.com/salesforce/ICLRec/master/data/Yelp.txt", 30_431),
    )
}


@dataclass(frozen=True)
class SplitData:
    """A leave-one-out split, one entry per user in the same order in all three lists."""

    name: str
    train: list[list[int]]  # per user: history without val and test items
    val: list[int]  # per user: the val item
    test: list[int]  # per user: the test item
    num_items: int  # largest item id (ids run 1..num_items; 0 is padding)
    source: str  # path the data came from

    def __post_init__(self) -> None:
        n = len(self.train)
        if n == 0 or len(self.val) != n or len(self.test) != n:
            raise ValueError(f"SplitData {self.name!r}: train, val and test need one entry per user and at "
                             f"least one user; got {n}, {len(self.val)}, {len(self.test)}")
        if min(map(len, self.train)) == 0:
            raise ValueError(f"SplitData {self.name!r}: every user needs a non-empty train history")
        top = max(max(map(max, self.train)), max(self.val), max(self.test))
        low = min(min(map(min, self.train)), min(self.val), min(self.test))
        if low < 1 or top > self.num_items:
            raise ValueError(f"SplitData {self.name!r}: item ids must lie in 1..num_items={self.num_items}; "
                             f"found {low}..{top}")

    @property
    def users(self) -> int:
        return len(self.train)

    def head(self, n: int) -> SplitData:
        """The first `n` users (0 = all). `num_items` is kept: a slice keeps the full item vocabulary."""
        if type(n) is not int or n < 0:
            raise ValueError(f"head(n) needs an int >= 0 (0 = all users); got {n!r}")
        if n == 0 or n >= self.users:
            return self
        return dataclasses.replace(self, train=self.train[:n], val=self.val[:n], test=self.test[:n])


# ---------------------------------------------------------------- where the files are


def resolve_data_dir(data_dir: str | None = None) -> Path:
    """`data_dir` > env ADREC_DATA_DIR > shared/datasets beside the repository > ~/.cache/adrec."""
    for value, origin in ((data_dir, "data_dir"), (os.environ.get(ENV_DATA_DIR), ENV_DATA_DIR)):
        if value:
            path = Path(value).expanduser()
            if not path.is_dir():
                raise ValueError(f"{origin}={value!r} is not an existing directory; create it or point "
                                 f"{origin} at the folder that holds the dataset files")
            return path.resolve()
    if SHARED_DATA_DIR.is_dir():
        return SHARED_DATA_DIR
    return cache_dir()


def cache_dir() -> Path:
    """Where downloads land by default (may not exist yet)."""
    return (Path.home() / ".cache" / "adrec").resolve()


def dataset_path(name_or_path: str, data_dir: str | None = None, *, url_base: str | None = None) -> Path:
    """The file of a registry dataset (found, checksum-verified, downloaded if missing) or an existing file."""
    info = REGISTRY.get(name_or_path)
    if info is None:
        path = Path(name_or_path).expanduser()
        if path.is_file():
            return path.resolve()
        raise ValueError(f"dataset {name_or_path!r} is neither a known dataset ({', '.join(REGISTRY)}) "
                         f"nor an existing file; pass one of those names or a path to a .pkl/.txt file")
    root = resolve_data_dir(data_dir)
    for candidate in (root / info.file, cache_dir() / info.file):
        if candidate.is_file():
            _verify(candidate, info)
            return candidate.resolve()
    explicit = Path(data_dir).expanduser().resolve() if data_dir else None
    writable = explicit is not None and explicit != SHARED_DATA_DIR and os.access(explicit, os.W_OK)
    base = url_base or os.environ.get(ENV_URL_BASE)
    url = f"{base.rstrip('/')}/{info.file}" if base else info.url
    return _download(info, explicit if writable else cache_dir(), url)


# ---------------------------------------------------------------- checksums and downloads

_SHA_CACHE: dict[tuple[str, int, int], str] = {}


def file_sha256(path: Path) -> str:
    """sha256 of a file, cached in-process per (path, mtime, size)."""
    st = path.stat()
    key = (str(path.resolve()), st.st_mtime_ns, st.st_size)
    if key not in _SHA_CACHE:
        _SHA_CACHE[key] = hashlib.sha256(path.read_bytes()).hexdigest()
    return _SHA_CACHE[key]


def _verify(path: Path, info: DatasetInfo) -> None:
    actual = file_sha256(path)
    if actual != info.sha256:
        raise ValueError(f"{path}: sha256 mismatch for dataset {info.name!r}: expected {info.sha256}, "
                         f"actual {actual}; the file is damaged or a different version: delete it "
                         f"(it is re-downloaded) or load an edited copy by its path instead of by name")


def _download(info: DatasetInfo, target_dir: Path, url: str) -> Path:
    """Stream `url` into a temp file beside the target; rename it into place only if the sha256 matches."""
    target_dir.mkdir(parents=True, exist_ok=True)
    dest = target_dir / info.file
    logger.info("downloading %s from %s into %s", info.file, url, target_dir)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{info.file}.", suffix=".part", dir=target_dir)
    tmp = Path(tmp_name)
    digest = hashlib.sha256()
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=60) as response:
            total = int(response.headers.get("Content-Length") or 0) or None
            from tqdm import tqdm  # only a download needs a progress bar

            with tqdm(total=total, unit="B", unit_scale=True, desc=f"download {info.file}") as bar:
                while chunk := response.read(1 << 16):
                    out.write(chunk)
                    digest.update(chunk)
                    bar.update(len(chunk))
            out.flush()
            os.fsync(out.fileno())
        actual = digest.hexdigest()
        if actual != info.sha256:
            raise ValueError(f"{info.file}: sha256 mismatch after downloading {url}: expected {info.sha256}, "
                             f"actual {actual}; nothing was saved. Check {ENV_URL_BASE} or the source, "
                             f"or place the right file in the data directory")
        tmp.chmod(0o644)
        os.replace(tmp, dest)
    except urllib.error.URLError as exc:
        raise OSError(f"could not download {info.file} from {url}: {exc.reason}; put the file in "
                      f"{target_dir} or set {ENV_DATA_DIR} to a folder that holds it") from exc
    finally:
        tmp.unlink(missing_ok=True)  # no-op after a successful rename
    return dest


# ---------------------------------------------------------------- readers


class _Refused(pickle.UnpicklingError):
    pass


class _RestrictedUnpickler(pickle.Unpickler):
    """Imports nothing, so no callable can reach REDUCE/BUILD/NEWOBJ: a pickle cannot run code here."""

    def find_class(self, module: str, name: str) -> None:
        raise _Refused(f"{module}.{name}")

    def persistent_load(self, pid: object) -> None:
        raise _Refused(f"persistent id {pid!r}")


def _refuse_extension_codes(raw: bytes) -> None:
    """find_class guards every import except an EXT opcode whose code copyreg has already resolved
    (both unpicklers read copyreg's cache first). That needs a copyreg.add_extension in this process,
    so only then pay for a scan of every opcode (~0.3 s for the largest file)."""
    if not getattr(copyreg, "_extension_registry", True):
        return
    for opcode, arg, _ in pickletools.genops(raw):
        if opcode.name in ("EXT1", "EXT2", "EXT4"):
            raise _Refused(f"copyreg extension code {arg}")


# Anything a corrupt or truncated byte stream can make the C unpickler raise.
_PICKLE_ERRORS = (pickle.UnpicklingError, EOFError, ValueError, TypeError, KeyError, IndexError,
                  AttributeError, OverflowError, MemoryError)


def _bad_id(path: Path, where: str, value: object) -> ValueError:
    if type(value) is not int:
        what = f"not an int ({type(value).__name__})"
    else:
        what = "negative" if value < 0 else "0 (the padding id)"
    return ValueError(f"{path}: {where} = {value!r:.40} is {what}; item ids must be ints >= 1")


def _check_ids(path: Path, where: str, ids: list) -> None:
    if set(map(type, ids)) <= {int} and min(ids) > 0:
        return
    for i, value in enumerate(ids):
        if type(value) is not int or value < 1:
            raise _bad_id(path, where.format(i), value)


def read_split_pickle(path: Path, raw: bytes | None = None) -> tuple[list[list[int]], list[int], list[int]]:
    """(train, val, test) of a split pickle; ValueError naming the file and user on anything unexpected."""
    raw = path.read_bytes() if raw is None else raw
    stream = io.BytesIO(raw)
    try:
        _refuse_extension_codes(raw)
        obj = _RestrictedUnpickler(stream).load()
    except _Refused as exc:
        raise ValueError(f"{path}: the pickle asks to import {exc}; this loader refuses to run code from a "
                         f"pickle and accepts only dicts, lists, ints and strings. Re-save the split as "
                         f"plain lists of ints") from None
    except _PICKLE_ERRORS as exc:
        raise ValueError(f"{path}: not a readable pickle (truncated or corrupt file?): "
                         f"{type(exc).__name__}: {exc}. Re-download or regenerate it") from exc
    if stream.tell() != len(stream.getbuffer()):
        raise ValueError(f"{path}: {len(stream.getbuffer()) - stream.tell()} bytes after the end of the "
                         f"pickle (corrupt or concatenated file?)")
    if type(obj) is not dict or set(obj) != {"train", "val", "test"}:
        got = sorted(obj, key=repr) if type(obj) is dict else type(obj).__name__
        raise ValueError(f"{path}: a split pickle holds a dict with keys 'train', 'val', 'test'; got {got}")
    for key in ("train", "val", "test"):
        if type(obj[key]) is not list:
            raise ValueError(f"{path}: {key!r} is a {type(obj[key]).__name__}; expected a list with one "
                             f"entry per user")
    train, val, test = obj["train"], obj["val"], obj["test"]
    if not (len(train) == len(val) == len(test)) or not train:
        raise ValueError(f"{path}: train, val and test must list the same users (at least one); got "
                         f"{len(train)}, {len(val)} and {len(test)} entries")
    for u, hist in enumerate(train):
        if type(hist) is not list or not hist:
            raise ValueError(f"{path}: user {u} has train history {hist!r:.40}; expected a non-empty list "
                             f"of item ids (every user needs at least one training item)")
        _check_ids(path, f"user {u}: train[{u}][{{}}]", hist)
    split: dict[str, list[int]] = {}
    for key, entries in (("val", val), ("test", test)):
        for u, entry in enumerate(entries):
            if type(entry) is not list or len(entry) != 1:
                raise ValueError(f"{path}: user {u}: {key}[{u}] = {entry!r:.40}; expected a 1-element list "
                                 f"[item_id] (leave-one-out)")
        split[key] = [entry[0] for entry in entries]
        _check_ids(path, f"user {{0}}: {key}[{{0}}][0]", split[key])
    return [list(h) for h in train], split["val"], split["test"]


_NOT_TEXT_ID = re.compile(r"[^0-9 \t\r\n]")


def read_sequence_text(path: Path, raw: bytes | None = None) -> tuple[list[list[int]], list[int], list[int]]:
    """(train, val, test) of a `user item item ...` file: last item test, second-to-last val."""
    raw = path.read_bytes() if raw is None else raw
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise ValueError(f"{path}, line {line}: byte {raw[exc.start]:#x} is not text; a sequence file holds "
                         f"only digits, spaces and newlines (binary or corrupt file?)") from None
    bad = _NOT_TEXT_ID.search(text)  # one scan instead of a check per token: signs, letters, '_', '.'
    if bad:
        line = text.count("\n", 0, bad.start()) + 1
        token = next((t for t in text.split("\n")[line - 1].split() if not t.isdigit()), bad.group())
        what = "a negative id" if re.fullmatch(r"-[0-9]+", token) else "not a non-negative integer"
        raise ValueError(f"{path}, line {line}: {token!r:.40} is {what}; each line is `user_id item_id ...` "
                         f"with ids written as plain digits")
    train: list[list[int]] = []
    val: list[int] = []
    test: list[int] = []
    seen: dict[int, int] = {}
    for line, content in enumerate(text.split("\n"), start=1):
        ids = list(map(int, content.split()))
        if not ids:
            continue  # blank line
        user, items = ids[0], ids[1:]
        if len(items) < 3:
            raise ValueError(f"{path}, line {line}: user {user} has {len(items)} items; the leave-one-out "
                             f"split needs at least 3 (train, val, test). Drop the user or filter the file")
        if user in seen:
            raise ValueError(f"{path}, line {line}: user {user} already appeared on line {seen[user]}; "
                             f"write one line per user")
        seen[user] = line
        if min(items) == 0:
            raise ValueError(f"{path}, line {line}: item id 0 is reserved for padding; item ids run from 1")
        train.append(items[:-2])
        val.append(items[-2])
        test.append(items[-1])
    if not train:
        raise ValueError(f"{path}: no users (empty file)")
    return train, val, test


def file_format(path: Path) -> Format:
    """Format of a file outside the registry, by suffix: .pkl/.pickle is a split pickle, anything else text."""
    return "split_pickle" if path.suffix.lower() in (".pkl", ".pickle") else "sequence_text"


def load_dataset(name_or_path: str, data_dir: str | None = None, max_users: int = 0, *,
                 url_base: str | None = None) -> SplitData:
    """Load a registry dataset or a file in either format; `max_users` keeps the first N users (0 = all)."""
    if type(max_users) is not int or max_users < 0:
        raise ValueError(f"max_users must be an int >= 0 (0 = all users); got {max_users!r}")
    path = dataset_path(name_or_path, data_dir, url_base=url_base)
    info = REGISTRY.get(name_or_path)
    fmt = info.format if info else file_format(path)
    reader = read_split_pickle if fmt == "split_pickle" else read_sequence_text
    train, val, test = reader(path)
    num_items = max(max(map(max, train)), max(val), max(test))
    data = SplitData(name=info.name if info else path.stem, train=train, val=val, test=test,
                     num_items=num_items, source=str(path))
    return data.head(max_users)


# ---------------------------------------------------------------- statistics


def stats(data: SplitData) -> dict:
    """Users, items (= num_items), interactions (train + val + test) and per-user length figures."""
    lengths = [len(h) + 2 for h in data.train]
    interactions = sum(lengths)
    return {"dataset": data.name, "users": len(lengths), "items": data.num_items,
            "interactions": interactions, "avg_len": interactions / len(lengths),
            "min_len": min(lengths), "max_len": max(lengths)}


def stats_table(data_dir: str | None = None, names: list[str] | None = None) -> pd.DataFrame:
    """One row of `stats` per dataset (default: every registry dataset), columns STATS_COLUMNS."""
    rows = [stats(load_dataset(name, data_dir)) for name in (names if names is not None else list(REGISTRY))]
    return pd.DataFrame(rows, columns=list(STATS_COLUMNS))
