"""adrec.data: registry, lookup order, downloads (loopback server), safe readers, statistics."""
from __future__ import annotations

import copyreg
import hashlib
import http.server
import os
import pickle
import pickletools
import re
import shutil
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest

from adrec import data

# The real files: ADREC_DATA_DIR as the caller set it, else shared/datasets beside the repository;
# resolved as the loader resolves every path (the folder may be a symlink).
REAL_DIR = Path(os.environ.get(data.ENV_DATA_DIR) or data.SHARED_DATA_DIR).resolve()

# shared/datasets/README.md: users, items, interactions, avg len, min len, max len.
README_STATS = {
    "baby": (11761, 4731, 92823, 7.89, 5, 87),
    "beauty": (10553, 6086, 94148, 8.92, 5, 140),
    "ml-100k": (938, 1008, 54413, 58.01, 5, 365),
    "sports": (22686, 12301, 185718, 8.19, 5, 261),
    "toys": (11268, 7309, 95420, 8.47, 5, 370),
    "yelp": (30431, 20033, 316354, 10.40, 5, 350),
}
ML_SHA = data.REGISTRY["ml-100k"].sha256


@pytest.fixture(autouse=True)
def isolated_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No test reads the caller's data dir or cache, and none can reach the internet by accident."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv(data.ENV_DATA_DIR, raising=False)
    monkeypatch.setenv(data.ENV_URL_BASE, "http://127.0.0.1:9")  # discard port: refused at once
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    return home


def real_file(name: str) -> Path:
    path = REAL_DIR / data.REGISTRY[name].file
    if not path.is_file():
        pytest.skip(f"{path} is missing: set {data.ENV_DATA_DIR} to the folder with the six datasets")
    return path


def row(d: data.SplitData) -> tuple:
    s = data.stats(d)
    return (s["users"], s["items"], s["interactions"], round(s["avg_len"], 2), s["min_len"], s["max_len"])


# ---------------------------------------------------------------- real data


@pytest.mark.parametrize("name", list(README_STATS))
def test_stats_equal_readme_table(name: str) -> None:
    real_file(name)
    d = data.load_dataset(name, str(REAL_DIR))
    assert row(d) == README_STATS[name]
    assert d.users == data.REGISTRY[name].users  # the registry's count (the cost estimate's) is the file's
    assert d.name == name and d.source == str((REAL_DIR / data.REGISTRY[name].file).resolve())
    assert len(d.val) == len(d.test) == len(d.train)


def test_registry_matches_readme_checksums() -> None:
    readme = REAL_DIR / "README.md"
    if not readme.is_file():
        pytest.skip(f"{readme} is missing")
    sums = dict(re.findall(r"^\| (\S+) \| .* \| ([0-9a-f]{64}) \|$", readme.read_text(), re.M))
    assert sums == {info.file: info.sha256 for info in data.REGISTRY.values()}
    assert list(data.REGISTRY) == ["baby", "beauty", "ml-100k", "sports", "toys", "yelp"]


def test_edited_copies_give_different_numbers(tmp_path: Path) -> None:
    full = data.read_split_pickle(real_file("ml-100k"))
    train, val, test = full[0][1:], full[1][1:], full[2][1:]  # drop user 0
    dropped = len(full[0][0]) + 2
    edited = tmp_path / "ml-edit.pkl"
    edited.write_bytes(pickle.dumps({"train": train, "val": [[v] for v in val], "test": [[t] for t in test]}))
    d = data.load_dataset(str(edited))
    assert d.name == "ml-edit" and d.source == str(edited)
    assert row(d)[:3] == (937, 1008, 54413 - dropped)

    lines = real_file("yelp").read_text().splitlines(keepends=True)
    yelp_edit = tmp_path / "yelp-edit.txt"
    yelp_edit.write_text("".join(lines[1:]))  # user 1 has 69 items
    assert row(data.load_dataset(str(yelp_edit))) == (30430, 20033, 316354 - 69, 10.39, 5, 350)


def test_a_symlinked_data_folder_and_file_give_the_resolved_path(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """A data folder reached through a symlink (a shared/ mount, a link in the home folder) names its
    files by their real path, whichever way it was given: one file, one name."""
    src = real_file("ml-100k")
    real = tmp_path / "real"
    real.mkdir()
    shutil.copy(src, real / "ml-100k.pkl")
    (tmp_path / "link").symlink_to(real, target_is_directory=True)
    linked_files = tmp_path / "files"
    linked_files.mkdir()
    (linked_files / "ml-100k.pkl").symlink_to(real / "ml-100k.pkl")
    expected = str(real / "ml-100k.pkl")
    assert data.resolve_data_dir(str(tmp_path / "link")) == real
    assert data.load_dataset("ml-100k", str(tmp_path / "link")).source == expected
    assert data.load_dataset("ml-100k", str(linked_files)).source == expected
    assert data.load_dataset(str(tmp_path / "link" / "ml-100k.pkl")).source == expected
    monkeypatch.setenv(data.ENV_DATA_DIR, str(tmp_path / "link"))
    assert data.resolve_data_dir() == real
    assert row(data.load_dataset("ml-100k")) == README_STATS["ml-100k"]


def test_stats_table_one_row_per_dataset() -> None:
    real_file("ml-100k")
    real_file("yelp")
    table = data.stats_table(str(REAL_DIR), names=["ml-100k", "yelp"])
    assert list(table.columns) == list(data.STATS_COLUMNS)
    assert table["dataset"].tolist() == ["ml-100k", "yelp"]
    assert table["users"].tolist() == [938, 30431]
    assert table["interactions"].tolist() == [54413, 316354]
    assert table["avg_len"].round(2).tolist() == [58.01, 10.40]


# ---------------------------------------------------------------- head and lookup


def test_head_keeps_first_users_and_full_vocabulary() -> None:
    real_file("ml-100k")
    d = data.load_dataset("ml-100k", str(REAL_DIR))
    h = d.head(10)
    assert (h.users, h.num_items, h.name, h.source) == (10, 1008, d.name, d.source)
    assert (h.train, h.val, h.test) == (d.train[:10], d.val[:10], d.test[:10])
    assert d.head(0) is d and d.head(10_000).users == 938
    sliced = data.load_dataset("ml-100k", str(REAL_DIR), max_users=5)
    assert (sliced.users, sliced.num_items, sliced.train) == (5, 1008, d.train[:5])
    with pytest.raises(ValueError, match=r"head\(n\) needs an int >= 0 \(0 = all users\); got -1"):
        d.head(-1)
    with pytest.raises(ValueError, match=r"max_users must be an int >= 0 \(0 = all users\); got -3"):
        data.load_dataset("ml-100k", str(REAL_DIR), max_users=-3)


def test_lookup_order_explicit_then_env_then_shared(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = real_file("ml-100k")
    explicit, env = tmp_path / "explicit", tmp_path / "env"
    for folder in (explicit, env):
        folder.mkdir()
        shutil.copy(src, folder / "ml-100k.pkl")
    repo = Path(__file__).resolve().parents[1]
    assert data.SHARED_DATA_DIR == (repo.parent / "shared" / "datasets").resolve()
    if data.SHARED_DATA_DIR.is_dir():
        assert data.resolve_data_dir() == data.SHARED_DATA_DIR
        assert data.load_dataset("ml-100k").source == str((data.SHARED_DATA_DIR / "ml-100k.pkl").resolve())
    monkeypatch.setenv(data.ENV_DATA_DIR, str(env))
    assert data.resolve_data_dir() == env
    assert data.load_dataset("ml-100k").source == str(env / "ml-100k.pkl")
    assert data.resolve_data_dir(str(explicit)) == explicit
    assert data.load_dataset("ml-100k", str(explicit)).source == str(explicit / "ml-100k.pkl")
    with pytest.raises(ValueError, match=r"data_dir='.*nope' is not an existing directory"):
        data.resolve_data_dir(str(tmp_path / "nope"))
    monkeypatch.setenv(data.ENV_DATA_DIR, str(tmp_path / "gone"))
    with pytest.raises(ValueError, match=r"ADREC_DATA_DIR='.*gone' is not an existing directory"):
        data.resolve_data_dir()
    # Last resort when there is no shared/ beside the checkout (a user's machine).
    monkeypatch.delenv(data.ENV_DATA_DIR)
    monkeypatch.setattr(data, "SHARED_DATA_DIR", tmp_path / "no-shared")
    assert data.resolve_data_dir() == Path(os.environ["HOME"]) / ".cache" / "adrec"


def test_unknown_name_lists_known_datasets() -> None:
    with pytest.raises(ValueError, match=r"'movielens' is neither a known dataset \(baby, beauty, ml-100k, "
                                         r"sports, toys, yelp\) nor an existing file"):
        data.load_dataset("movielens")


def test_file_outside_registry_format_by_suffix(tmp_path: Path) -> None:
    text = tmp_path / "tiny.dat"  # not .pkl: read as sequence text
    text.write_text("7 1 2 3 4\n\n8 2  3\t4 5\r\n")
    d = data.load_dataset(str(text))
    assert (d.name, d.train, d.val, d.test, d.num_items) == ("tiny", [[1, 2], [2, 3]], [3, 4], [4, 5], 5)
    pkl = tmp_path / "tiny.pickle"
    pkl.write_bytes(pickle.dumps({"train": [[1, 2], [2, 3]], "val": [[3], [4]], "test": [[4], [9]]}))
    d = data.load_dataset(str(pkl))
    assert (d.name, d.train, d.val, d.test, d.num_items) == ("tiny", [[1, 2], [2, 3]], [3, 4], [4, 9], 9)
    assert row(d) == (2, 9, 8, 4.0, 4, 4)


def test_registry_file_with_wrong_checksum_is_refused(tmp_path: Path) -> None:
    bad = tmp_path / "ml-100k.pkl"
    bad.write_bytes(real_file("ml-100k").read_bytes() + b"\n")
    actual = hashlib.sha256(bad.read_bytes()).hexdigest()
    with pytest.raises(ValueError, match=rf"{re.escape(str(bad))}: sha256 mismatch for dataset 'ml-100k': "
                                         rf"expected {ML_SHA}, actual {actual}"):
        data.load_dataset("ml-100k", str(tmp_path))


def test_checksum_cache_follows_edits(tmp_path: Path) -> None:
    path = tmp_path / "f.bin"
    path.write_bytes(b"abc")
    assert data.file_sha256(path) == hashlib.sha256(b"abc").hexdigest()
    path.write_bytes(b"abcd")
    assert data.file_sha256(path) == hashlib.sha256(b"abcd").hexdigest()


# ---------------------------------------------------------------- reader errors


@pytest.mark.parametrize("content, message", [
    ("1 2 3 4\n2 5 x 7\n", r"line 2: 'x' is not a non-negative integer"),
    ("1 2 3 4\n2 5 6.5 7\n", r"line 2: '6.5' is not a non-negative integer"),
    ("1 2 3 4\n\n3 5 -6 7\n", r"line 3: '-6' is a negative id"),
    ("1 2 0 4\n", r"line 1: item id 0 is reserved for padding"),
    ("1 2 3 4\n2 5 6\n", r"line 2: user 2 has 2 items; the leave-one-out split needs at least 3"),
    ("1 2 3 4\n9\n", r"line 2: user 9 has 0 items"),
    ("1 2 3 4\n1 5 6 7\n", r"line 2: user 1 already appeared on line 1"),
    ("\n\n", r": no users \(empty file\)"),
    ("1 2 3 4\n2 3 \xe9 5\n", r"line 2: byte 0xc3 is not text"),
], ids=["letter", "float", "negative", "zero-item", "two-items", "no-items", "duplicate-user", "empty",
        "binary"])
def test_sequence_text_errors(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "bad.txt"
    path.write_bytes(content.encode("utf-8"))
    with pytest.raises(ValueError, match=re.escape(str(path)) + ".*" + message):
        data.load_dataset(str(path))


@pytest.mark.parametrize("obj, message", [
    ({"train": [[1, "2"]], "val": [[3]], "test": [[4]]}, r"user 0: train\[0\]\[1\] = '2' is not an int \(str\)"),
    ({"train": [[1], [2, -5]], "val": [[3], [3]], "test": [[4], [4]]}, r"user 1: train\[1\]\[1\] = -5 is negative"),
    ({"train": [[1.5]], "val": [[3]], "test": [[4]]}, r"train\[0\]\[0\] = 1.5 is not an int \(float\)"),
    ({"train": [[True]], "val": [[3]], "test": [[4]]}, r"train\[0\]\[0\] = True is not an int \(bool\)"),
    ({"train": [[1], [2]], "val": [[3], [0]], "test": [[4], [4]]}, r"user 1: val\[1\]\[0\] = 0 is 0 \(the padding id\)"),
    ({"train": [[1], [2]], "val": [[3], [3]], "test": [[4], [-4]]}, r"user 1: test\[1\]\[0\] = -4 is negative"),
    ({"train": [[1], []], "val": [[3], [3]], "test": [[4], [4]]}, r"user 1 has train history \[\]; expected a non-empty"),
    ({"train": [(1, 2)], "val": [[3]], "test": [[4]]}, r"user 0 has train history \(1, 2\); expected a non-empty list"),
    ({"train": [[1], [2]], "val": [[3]], "test": [[4], [4]]}, r"same users \(at least one\); got 2, 1 and 2 entries"),
    ({"train": [], "val": [], "test": []}, r"got 0, 0 and 0 entries"),
    ({"train": [[1]], "val": [[2, 3]], "test": [[4]]}, r"user 0: val\[0\] = \[2, 3\]; expected a 1-element list"),
    ({"train": [[1]], "val": [3], "test": [[4]]}, r"user 0: val\[0\] = 3; expected a 1-element list"),
    ({"train": [[1]], "val": [[3]]}, r"keys 'train', 'val', 'test'; got \['train', 'val'\]"),
    ([[1], [2], [3]], r"keys 'train', 'val', 'test'; got list"),
    ({"train": {0: [1]}, "val": [[3]], "test": [[4]]}, r"'train' is a dict; expected a list"),
], ids=["str-item", "negative", "float", "bool", "zero-val", "negative-test", "empty-train", "tuple", "lengths",
        "no-users", "two-val", "bare-val", "missing-key", "top-list", "dict-train"])
def test_split_pickle_errors(tmp_path: Path, obj: object, message: str) -> None:
    path = tmp_path / "bad.pkl"
    path.write_bytes(pickle.dumps(obj))
    with pytest.raises(ValueError, match=re.escape(str(path)) + ": .*" + message):
        data.load_dataset(str(path))


class RunsShell:
    """A pickle payload: unpickling it with the default unpickler runs `touch <marker>`."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("protocol", [0, 2, pickle.HIGHEST_PROTOCOL])
def test_pickle_that_runs_code_is_refused_and_nothing_runs(tmp_path: Path, protocol: int) -> None:
    marker = tmp_path / "pwned"
    payload = pickle.dumps({"train": [[1]], "val": [[RunsShell(marker)]], "test": [[2]]}, protocol=protocol)
    path = tmp_path / "evil.pkl"
    path.write_bytes(payload)
    with pytest.raises(ValueError, match=re.escape(str(path)) + r": the pickle asks to import posix.system; "
                                         r"this loader refuses to run code"):
        data.load_dataset(str(path))
    assert not marker.exists()
    pickle.loads(payload)  # the payload is live: the default unpickler does run it
    assert marker.exists()


def test_cached_copyreg_extension_code_is_refused(tmp_path: Path) -> None:
    """An EXT opcode skips find_class once copyreg has resolved its code: the loader must still refuse it."""
    marker = tmp_path / "pwned"
    code = 0x7FFF_FF01
    copyreg.add_extension("posix", "system", code)
    try:
        payload = pickle.dumps({"train": [[1]], "val": [[RunsShell(marker)]], "test": [[2]]}, protocol=2)
        assert "EXT4" in {op.name for op, _, _ in pickletools.genops(payload)}
        pickle.loads(payload)  # resolves the code into copyreg's cache (and runs the payload once)
        marker.unlink()
        path = tmp_path / "evil.pkl"
        path.write_bytes(payload)
        with pytest.raises(ValueError, match=r"asks to import copyreg extension code 2147483393; this "
                                             r"loader refuses to run code"):
            data.load_dataset(str(path))
        assert not marker.exists()
    finally:
        copyreg.remove_extension("posix", "system", code)


@pytest.mark.parametrize("cut, message", [
    (lambda raw: raw[: len(raw) // 2], r"not a readable pickle \(truncated or corrupt file\?\): "),
    (lambda raw: raw[:1], r"not a readable pickle \(truncated or corrupt file\?\): "),
    (lambda raw: b"definitely not a pickle", r"not a readable pickle \(truncated or corrupt file\?\): "),
    (lambda raw: b"", r"not a readable pickle \(truncated or corrupt file\?\): EOFError"),
    (lambda raw: raw + b"\x00\x00", r"2 bytes after the end of the pickle"),
], ids=["half", "one-byte", "garbage", "empty", "trailing"])
def test_truncated_or_corrupt_pickle(tmp_path: Path, cut, message: str) -> None:
    path = tmp_path / "cut.pkl"
    path.write_bytes(cut(real_file("ml-100k").read_bytes()))
    with pytest.raises(ValueError, match=re.escape(str(path)) + ": " + message):
        data.load_dataset(str(path))


# ---------------------------------------------------------------- downloads (loopback mirror)


@pytest.fixture
def mirror(tmp_path: Path):
    """A ThreadingHTTPServer on 127.0.0.1 (random port) serving tmp_path/mirror; records request paths."""
    root = tmp_path / "mirror"
    root.mkdir()
    requests: list[str] = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, directory=str(root), **kwargs)

        def do_GET(self) -> None:
            requests.append(self.path)
            super().do_GET()

        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield SimpleNamespace(url=f"http://127.0.0.1:{server.server_address[1]}", root=root, requests=requests)
    server.shutdown()
    server.server_close()
    thread.join()


def test_download_into_explicit_data_dir(tmp_path: Path, mirror, isolated_env: Path) -> None:
    shutil.copy(real_file("ml-100k"), mirror.root / "ml-100k.pkl")
    target = tmp_path / "target"
    target.mkdir()
    d = data.load_dataset("ml-100k", str(target), url_base=mirror.url + "/")
    assert row(d) == README_STATS["ml-100k"]
    assert d.source == str(target / "ml-100k.pkl")
    assert os.listdir(target) == ["ml-100k.pkl"]  # no temp file left behind
    assert hashlib.sha256((target / "ml-100k.pkl").read_bytes()).hexdigest() == ML_SHA
    assert mirror.requests == ["/ml-100k.pkl"]
    assert not (isolated_env / ".cache").exists()


def test_download_into_cache_then_reuse(tmp_path: Path, mirror, isolated_env: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    shutil.copy(real_file("ml-100k"), mirror.root / "ml-100k.pkl")
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv(data.ENV_DATA_DIR, str(empty))  # resolved dir lacks the file: download to the cache
    monkeypatch.setenv(data.ENV_URL_BASE, mirror.url)
    cached = isolated_env / ".cache" / "adrec" / "ml-100k.pkl"
    assert data.dataset_path("ml-100k") == cached
    assert data.load_dataset("ml-100k").source == str(cached)
    assert mirror.requests == ["/ml-100k.pkl"]  # the second lookup found the cached copy
    assert os.listdir(empty) == [] and os.listdir(cached.parent) == ["ml-100k.pkl"]


def test_download_checksum_mismatch_saves_nothing(tmp_path: Path, mirror) -> None:
    corrupt = bytearray(real_file("ml-100k").read_bytes())
    corrupt[100] ^= 0xFF
    (mirror.root / "ml-100k.pkl").write_bytes(corrupt)
    actual = hashlib.sha256(corrupt).hexdigest()
    target = tmp_path / "target"
    target.mkdir()
    with pytest.raises(ValueError, match=rf"ml-100k.pkl: sha256 mismatch after downloading "
                                         rf"{re.escape(mirror.url)}/ml-100k.pkl: expected {ML_SHA}, "
                                         rf"actual {actual}; nothing was saved"):
        data.load_dataset("ml-100k", str(target), url_base=mirror.url)
    assert os.listdir(target) == []


def test_download_failure_names_url_and_fix(tmp_path: Path, mirror) -> None:
    target = tmp_path / "target"
    target.mkdir()
    with pytest.raises(OSError, match=rf"could not download yelp.txt from {re.escape(mirror.url)}/yelp.txt: "
                                      rf"File not found; put the file in {re.escape(str(target))}"):
        data.load_dataset("yelp", str(target), url_base=mirror.url)
    assert os.listdir(target) == []
