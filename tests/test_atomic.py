"""Crash-safe saving (``peft_palora/utils/atomic.py``): bundles switch as a whole, temporaries never pile up, files get
the permissions of a plain ``open()``.

The SIGKILL loops run the savers in children forked by a small server process (it imports the code once, so each
kill costs a fork, not an interpreter start): the server forks a saver that saves two alternating bundles into one
folder without end, the test kills it at a random instant (seeded), and then checks that the folder is one complete
bundle (every file's content belongs to the same save), and that after the next save no temporary entry is left.
The file-level loops load ``_atomic.py`` by path, so they test that module alone; the model loop goes through
``PeftModel.save_pretrained`` (it depends on the save wrapper keeping saves inside ``atomic_directory``).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import random
import select
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

ATOMIC_PATH = Path(__file__).resolve().parent.parent / "peft_palora" / "utils" / "atomic.py"
FILES = ("adapter_config.json", "adapter_model.safetensors", "sub/nested.txt", "README.md")
USER_FILE = "my_notes.txt"
USER_TEXT = "the user's own file: it must survive every save\n"


def _load_atomic():
    spec = importlib.util.spec_from_file_location("palora_atomic_under_test", ATOMIC_PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


atomic = _load_atomic()


# ---------------------------------------------------------------------------------------------------------------------
# Bundles whose every file says which save wrote it
# ---------------------------------------------------------------------------------------------------------------------
def file_content(generation: int, name: str) -> bytes:
    """Deterministic content of ``name`` in save number ``generation``; sizes differ between saves (odd ones are
    bigger), so a save takes long enough to be killed in the middle."""
    size = (300_000 if generation % 2 else 40_000) + 1_000 * (FILES.index(name) if name in FILES else 7)
    seed = hashlib.sha256(f"{generation}/{name}".encode()).digest()
    body = (seed * (size // len(seed) + 1))[:size]
    return f"generation={generation} name={name}\n".encode() + body


def write_bundle(directory: str, generation: int) -> None:
    for name in FILES:
        path = os.path.join(directory, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as handle:
            handle.write(file_content(generation, name))


def bundle_generation(read) -> int:
    """The one save that wrote every file of a bundle; fails if files of two saves are mixed or any is torn."""
    generations = set()
    for name in FILES:
        data = read(name)
        header = data.split(b"\n", 1)[0].decode()
        generation = int(header.split()[0].split("=")[1])
        assert data == file_content(generation, name), f"{name} is torn or corrupt (header {header!r})"
        generations.add(generation)
    assert len(generations) == 1, f"files of different saves side by side: {sorted(generations)}"
    return generations.pop()


def read_from(directory: str):
    def read(name: str) -> bytes:
        with open(os.path.join(directory, name), "rb") as handle:
            return handle.read()

    return read


def temporaries(parent: str) -> list[str]:
    """Every entry a save may leave behind, in the bundle's folder and inside the bundle."""
    found = [name for name in os.listdir(parent) if ".palora-" in name or name.startswith(".tmp-")]
    for root, directories, files in os.walk(parent):
        found += [os.path.join(root, n) for n in directories + files if ".palora-" in n or n.startswith(".tmp-")]
    return sorted(set(found))


# ---------------------------------------------------------------------------------------------------------------------
# The fork server
# ---------------------------------------------------------------------------------------------------------------------
SERVER = textwrap.dedent(
    r"""
    import importlib.util, os, signal, sys, time
    mode, atomic_path, test_path = sys.argv[1:4]
    spec = importlib.util.spec_from_file_location("palora_atomic_under_test", atomic_path)
    atomic = importlib.util.module_from_spec(spec); spec.loader.exec_module(atomic)
    spec = importlib.util.spec_from_file_location("atomic_test_helpers", test_path)
    helpers = importlib.util.module_from_spec(spec); spec.loader.exec_module(helpers)
    models = None
    if mode == "model":
        import torch
        torch.set_num_threads(1)
        models = helpers.tiny_models()
    print("ready", flush=True)
    children = []
    for line in sys.stdin:
        command, *args = line.split()
        if command == "save":  # save without end from generation args[1] on; then "kill"
            protocol, target, generation = args[0], args[1], int(args[2])
            pid = os.fork()
            if pid == 0:
                if protocol == "two-renames":
                    atomic._rename_exchange = lambda first, second: False
                try:
                    while True:
                        if models is None:
                            with atomic.atomic_directory(target) as staging:
                                helpers.write_bundle(staging, generation)
                        else:
                            models[generation % 2].save_pretrained(target)
                        generation += 1
                except BaseException:
                    import traceback; traceback.print_exc()
                finally:
                    os._exit(0)
            children = [pid]
            print(pid, flush=True)
        elif command == "once":  # one save by the server itself: args target, generation
            if models is None:
                with atomic.atomic_directory(args[0]) as staging:
                    helpers.write_bundle(staging, int(args[1]))
            else:
                models[int(args[1]) % 2].save_pretrained(args[0])
            print("saved", flush=True)
        elif command == "race":  # args: target, saves per saver, generations of the savers...
            target, saves, *firsts = args
            children = []
            for first in map(int, firsts):
                pid = os.fork()
                if pid == 0:
                    try:
                        for i in range(int(saves)):
                            with atomic.atomic_directory(target) as staging:
                                helpers.write_bundle(staging, first + 2 * i)
                        code = 0
                    except BaseException as error:
                        print("saver failed:", repr(error), file=sys.stderr, flush=True)
                        code = 1
                    os._exit(code)
                children.append(pid)
            codes = [os.waitpid(pid, 0)[1] for pid in children]
            print("done", *codes, flush=True)
        elif command == "kill":
            for pid in children:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)  # reaped: the saver's pid is now free, as after any crash
            print("killed", flush=True)
    """
)


def tiny_models():
    """Two tiny PaLoRA models that differ in config (rank) and weights. Used by the server in "model" mode."""
    import torch
    from peft import get_peft_model
    from torch import nn

    from peft_palora import PaLoRAConfig

    models = []
    for rank in (2, 3):
        torch.manual_seed(rank)
        base = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8))
        config = PaLoRAConfig(task_names=["a", "b"], r=rank, target_modules=["0", "2"], init_weights=False)
        models.append(get_peft_model(base, config))
    return models


class Server:
    def __init__(self, mode: str):
        env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ATOMIC_PATH.parent.parent))
        self.process = subprocess.Popen(
            [sys.executable, "-c", SERVER, mode, str(ATOMIC_PATH), __file__],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        assert self.ask(None, timeout=120) == "ready"

    def ask(self, line: str | None, timeout: float = 60) -> str:
        if line is not None:
            self.process.stdin.write(line + "\n")
            self.process.stdin.flush()
        ready, _, _ = select.select([self.process.stdout], [], [], timeout)
        assert ready, f"the saver server did not answer {line!r} within {timeout} s"
        answer = self.process.stdout.readline().strip()
        assert answer, f"the saver server died (exit code {self.process.poll()})"
        return answer

    def close(self) -> None:
        self.process.stdin.close()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


@pytest.fixture
def files_server():
    server = Server("files")
    yield server
    server.close()


# ---------------------------------------------------------------------------------------------------------------------
# SIGKILL at random instants
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("protocol", ["exchange", "two-renames"])
def test_a_save_killed_at_any_instant_leaves_one_whole_bundle_and_no_debris(files_server, tmp_path, protocol):
    rng = random.Random(20260101)
    target = str(tmp_path / "bundle")
    Path(target).mkdir()
    Path(target, USER_FILE).write_text(USER_TEXT)
    save_times = []
    for generation in (1, 2):  # kills are spread over ~3 saves, whatever the speed of the machine
        started = time.perf_counter()
        with atomic.atomic_directory(target) as staging:
            write_bundle(staging, generation)
        save_times.append(time.perf_counter() - started)
    save_time = max(save_times)
    kills, mid_save, changed = 0, 0, 0
    deadline = time.monotonic() + 60
    while kills < 24 and time.monotonic() < deadline:
        files_server.ask(f"save {protocol} {target} {generation + 1}")
        time.sleep(rng.uniform(0.0, 3 * save_time))
        assert files_server.ask("kill") == "killed"
        kills += 1
        left = temporaries(str(tmp_path))
        mid_save += bool(left)
        if protocol == "two-renames" and not os.path.exists(target):
            assert atomic.recover_interrupted_save(target)  # what the next save (or a loader) does first
        found = bundle_generation(read_from(target))
        assert found >= generation, "the folder went back to a save older than the one before the kill"
        changed += found != generation
        generation = found
        assert Path(target, USER_FILE).read_text() == USER_TEXT
        if kills % 6 == 0 or not left:
            continue
        # the next save cleans up after the killed one
        generation += 1
        with atomic.atomic_directory(target) as staging:
            write_bundle(staging, generation)
        assert bundle_generation(read_from(target)) == generation
        assert temporaries(str(tmp_path)) == []
        assert Path(target, USER_FILE).read_text() == USER_TEXT
    assert kills >= 20, f"only {kills} kills in the time allowed"
    # the loop must have hit saves in the middle (temporaries present) and saves that completed
    assert mid_save >= 5 and changed >= 3, (mid_save, changed)
    generation += 1
    with atomic.atomic_directory(target) as staging:
        write_bundle(staging, generation)
    assert temporaries(str(tmp_path)) == [] and sorted(os.listdir(tmp_path)) == ["bundle"]


def test_concurrent_savers_never_mix_their_bundles(files_server, tmp_path):
    target = str(tmp_path / "bundle")
    with atomic.atomic_directory(target) as staging:
        write_bundle(staging, 0)
    Path(target, USER_FILE).write_text(USER_TEXT)
    saves = 15
    files_server.process.stdin.write(f"race {target} {saves} 1 2\n")  # one saver writes odd generations, one even
    files_server.process.stdin.flush()
    reads, seen = 0, set()
    # Meanwhile read the bundle the way a careful loader does: open the folder once, its files relative to it.
    while not select.select([files_server.process.stdout], [], [], 0)[0]:
        try:
            folder = os.open(target, os.O_RDONLY)
        except FileNotFoundError:
            pytest.fail("the bundle folder was missing while another process saved into it")
        try:

            def read(name, folder=folder):
                fd = os.open(name, os.O_RDONLY, dir_fd=folder)
                with os.fdopen(fd, "rb") as handle:
                    return handle.read()

            seen.add(bundle_generation(read))
            reads += 1
        except FileNotFoundError:
            pass  # the snapshot was replaced and deleted while it was read: read the new one
        finally:
            os.close(folder)
    assert files_server.ask(None) == "done 0 0"
    final = bundle_generation(read_from(target))
    assert final in (2 * saves - 1, 2 * saves)  # the last save of one of the two savers
    assert Path(target, USER_FILE).read_text() == USER_TEXT
    assert temporaries(str(tmp_path)) == []
    assert reads >= 5 and len(seen) >= 2, (reads, seen)


@pytest.mark.slow
def test_save_pretrained_killed_at_any_instant_leaves_one_whole_model(tmp_path):
    """Depends on ``PeftModel.save_pretrained`` (the save wrapper) staging the bundle through atomic_directory."""
    from safetensors import safe_open

    server = Server("model")
    try:
        rng = random.Random(7)
        target = str(tmp_path / "model")
        references = []
        for which in (0, 1):  # what each model's bundle holds, from one undisturbed save each
            assert server.ask(f"once {tmp_path / f'reference-{which}'} {which}") == "saved"
            reference = tmp_path / f"reference-{which}"
            with safe_open(str(reference / "adapter_model.safetensors"), "pt") as handle:
                tensors = {key: handle.get_tensor(key) for key in handle.keys()}
            references.append((json.loads((reference / "adapter_config.json").read_text()), tensors))
        assert references[0][0]["r"] != references[1][0]["r"]
        # how long a freshly forked saver takes to finish its first save: kills are spread over ~3 times that
        started = time.perf_counter()
        server.ask(f"save exchange {target} 1")
        while not os.path.exists(os.path.join(target, "adapter_config.json")):
            assert time.perf_counter() - started < 60, "the saver never finished a save"
            time.sleep(0.005)
        first_save = time.perf_counter() - started
        server.ask("kill")
        kills, changed, previous = 0, 0, None
        deadline = time.monotonic() + 90
        while kills < 20 and time.monotonic() < deadline:
            server.ask(f"save exchange {target} {kills}")
            time.sleep(rng.uniform(0.0, 3 * first_save))
            server.ask("kill")
            kills += 1
            config = json.loads(Path(target, "adapter_config.json").read_text())
            which = [reference[0]["r"] for reference in references].index(config["r"])
            assert config == references[which][0]
            with safe_open(os.path.join(target, "adapter_model.safetensors"), "pt") as handle:
                assert sorted(handle.keys()) == sorted(references[which][1])
                for key in handle.keys():
                    assert handle.get_tensor(key).equal(references[which][1][key]), f"{key} is from the other model"
            changed += previous is not None and which != previous
            previous = which
        assert kills >= 20 and changed >= 2, (kills, changed)
        assert server.ask(f"once {target} 0") == "saved"  # the next save leaves nothing of the killed ones
        assert temporaries(str(tmp_path)) == []
    finally:
        server.close()


# ---------------------------------------------------------------------------------------------------------------------
# What a save keeps, and what it refuses
# ---------------------------------------------------------------------------------------------------------------------
def test_files_the_new_save_does_not_write_survive_as_hard_links(tmp_path):
    target = tmp_path / "bundle"
    with atomic.atomic_directory(target) as staging:
        write_bundle(staging, 1)
    (target / "base_model").mkdir()
    (target / "base_model" / "model.safetensors").write_bytes(b"base weights")
    (target / "other_adapter").mkdir(mode=0o750)
    (target / "other_adapter" / "adapter_config.json").write_text("{}")
    (target / "README.md").write_text("edited by the user")
    (target / "link").symlink_to("base_model/model.safetensors")
    inode = (target / "base_model" / "model.safetensors").stat().st_ino
    with atomic.atomic_directory(target) as staging:
        write_bundle(staging, 2)
    assert bundle_generation(read_from(str(target))) == 2  # the new save's README wins over the edited one
    assert (target / "base_model" / "model.safetensors").read_bytes() == b"base weights"
    assert (target / "base_model" / "model.safetensors").stat().st_ino == inode  # linked, not copied
    assert (target / "other_adapter" / "adapter_config.json").read_text() == "{}"
    assert stat.S_IMODE((target / "other_adapter").stat().st_mode) == 0o750
    assert os.readlink(target / "link") == "base_model/model.safetensors"
    # a save that does not write README.md keeps the user's edits
    (target / "README.md").write_text("edited again")
    with atomic.atomic_directory(target) as staging:
        Path(staging, "adapter_config.json").write_text('{"r": 1}')
    assert (target / "README.md").read_text() == "edited again"
    assert (target / "adapter_config.json").read_text() == '{"r": 1}'
    assert temporaries(str(tmp_path)) == []


def test_keep_other_files_false_makes_the_target_exactly_the_new_save(tmp_path):
    target = tmp_path / "checkpoint-10"
    with atomic.atomic_directory(target) as staging:
        Path(staging, "random_states_1.pkl").write_text("from an earlier run with two processes")
        write_bundle(staging, 1)
    with atomic.atomic_directory(target, keep_other_files=False) as staging:
        write_bundle(staging, 2)
    assert sorted(str(p.relative_to(target)) for p in target.rglob("*") if p.is_file()) == sorted(FILES)
    assert bundle_generation(read_from(str(target))) == 2


def test_an_exception_in_the_block_leaves_the_target_as_it_was(tmp_path):
    target = tmp_path / "bundle"
    with atomic.atomic_directory(target) as staging:
        write_bundle(staging, 1)
    with pytest.raises(RuntimeError, match="saver failed"):
        with atomic.atomic_directory(target) as staging:
            write_bundle(staging, 2)
            raise RuntimeError("saver failed")
    assert bundle_generation(read_from(str(target))) == 1
    assert temporaries(str(tmp_path)) == []
    with pytest.raises(RuntimeError):
        with atomic.atomic_directory(tmp_path / "new") as staging:
            raise RuntimeError
    assert sorted(os.listdir(tmp_path)) == ["bundle"]


def test_a_save_inside_a_save_in_progress_writes_into_its_staging_directory(tmp_path):
    target = tmp_path / "bundle"
    with atomic.atomic_directory(target) as outer:
        with atomic.atomic_directory(outer) as inner:
            assert inner == outer
            write_bundle(inner, 3)
        assert not target.exists()  # nothing visible until the outer save ends
        Path(outer, "task_heads.safetensors").write_bytes(b"heads")
    assert bundle_generation(read_from(str(target))) == 3
    assert (target / "task_heads.safetensors").read_bytes() == b"heads"
    assert temporaries(str(tmp_path)) == []


def test_a_symlinked_target_is_saved_where_it_points_and_stays_a_link(tmp_path):
    real = tmp_path / "real"
    with atomic.atomic_directory(real) as staging:
        write_bundle(staging, 1)
    (tmp_path / "link").symlink_to(real)
    with atomic.atomic_directory(tmp_path / "link") as staging:
        write_bundle(staging, 2)
    assert (tmp_path / "link").is_symlink() and bundle_generation(read_from(str(real))) == 2


def test_saving_into_the_working_directory_keeps_it_usable(tmp_path, monkeypatch):
    target = tmp_path / "bundle"
    with atomic.atomic_directory(target) as staging:
        write_bundle(staging, 1)
    monkeypatch.chdir(target)
    with atomic.atomic_directory(".") as staging:
        write_bundle(staging, 2)
    assert os.getcwd() == str(target.resolve())
    assert bundle_generation(read_from(".")) == 2  # relative paths reach the new bundle, not a deleted one


def test_two_renames_and_recovery_where_exchange_is_unavailable(tmp_path, monkeypatch):
    monkeypatch.setattr(atomic, "_rename_exchange", lambda first, second: False)
    target = tmp_path / "bundle"
    with atomic.atomic_directory(target) as staging:
        write_bundle(staging, 1)
    with atomic.atomic_directory(target) as staging:
        write_bundle(staging, 2)
    assert bundle_generation(read_from(str(target))) == 2 and temporaries(str(tmp_path)) == []
    # a save killed between its two renames: the old bundle aside (owner dead), the new one complete in staging
    dead = dead_pid()
    aside = tmp_path / f".bundle.palora-old-{atomic._digest('bundle')}-{atomic._HOST}-{dead}-0-0123abcd"
    staging = tmp_path / f".bundle.palora-staging-{atomic._digest('bundle')}-{atomic._HOST}-{dead}-0-4567abcd"
    os.rename(target, aside)
    staging.mkdir()
    write_bundle(str(staging), 3)
    assert not atomic.recover_interrupted_save(tmp_path / "elsewhere")
    assert atomic.recover_interrupted_save(target)
    assert bundle_generation(read_from(str(target))) == 2
    assert not atomic.recover_interrupted_save(target)  # nothing left to recover
    with atomic.atomic_directory(target) as staging:
        write_bundle(staging, 4)
    assert temporaries(str(tmp_path)) == []


def test_a_symlinked_bundle_left_aside_by_a_killed_save_is_recovered(tmp_path, monkeypatch):
    monkeypatch.setattr(atomic, "_rename_exchange", lambda first, second: False)
    real, link = tmp_path / "real", tmp_path / "link"
    with atomic.atomic_directory(real) as staging:
        write_bundle(staging, 1)
    link.symlink_to(real)
    os.rename(real, tmp_path / f".real.palora-old-{atomic._digest('real')}-{atomic._HOST}-{dead_pid()}-0-89abcdef")
    assert not link.exists()  # the link dangles until the bundle is put back
    with atomic.atomic_directory(link) as staging:
        write_bundle(staging, 2)
    assert link.is_symlink() and bundle_generation(read_from(str(real))) == 2
    assert temporaries(str(tmp_path)) == []


def test_threads_saving_into_one_folder_never_mix_their_bundles(tmp_path):
    import threading

    target = tmp_path / "bundle"
    errors = []

    def saver(first: int) -> None:
        try:
            for i in range(6):
                with atomic.atomic_directory(target) as staging:
                    write_bundle(staging, first + 2 * i)
        except BaseException as error:  # reported below
            errors.append(error)

    threads = [threading.Thread(target=saver, args=(first,)) for first in (1, 2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert bundle_generation(read_from(str(target))) in (11, 12)
    assert temporaries(str(tmp_path)) == []


def test_a_mount_point_is_saved_file_by_file_with_a_warning(tmp_path, monkeypatch, caplog):
    target = tmp_path / "bundle"
    with atomic.atomic_directory(target) as staging:
        write_bundle(staging, 1)
    monkeypatch.setattr(atomic.os.path, "ismount", lambda path: os.fspath(path) == str(target))
    with caplog.at_level(logging.WARNING):
        with atomic.atomic_directory(target) as staging:
            assert os.path.dirname(staging) == str(target)
            write_bundle(staging, 2)
    assert "replaced one by one" in caplog.text
    assert bundle_generation(read_from(str(target))) == 2 and temporaries(str(tmp_path)) == []


def dead_pid() -> int:
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid  # reaped: free (reuse within the test is astronomically unlikely and would only keep debris)


def test_only_debris_of_dead_owners_of_this_host_is_removed(tmp_path):
    digest = atomic._digest("bundle")
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        own_start = atomic._owner().rsplit("-", 1)[1]
        names = {
            "dead": f".bundle.palora-staging-{digest}-{atomic._HOST}-{dead_pid()}-0-00000001",
            "dead-file": f".x.json.palora-tmp-{atomic._digest('x.json')}-{atomic._HOST}-{dead_pid()}-0-00000002.txt",
            "reused-pid": f".bundle.palora-staging-{digest}-{atomic._HOST}-{os.getpid()}-{int(own_start) + 1}-00000003",
            "live": f".bundle.palora-staging-{digest}-{atomic._HOST}-{alive.pid}-0-00000004",
            "own": f".bundle.palora-staging-{digest}-{atomic._owner()}-00000005",
            "other-host": f".bundle.palora-staging-{digest}-{'0' * 8}-{dead_pid()}-0-00000006",
            "not-ours": ".bundle.palora-staging-mine",
        }
        for key, name in names.items():
            (tmp_path / name).mkdir() if "file" not in key else (tmp_path / name).write_text("x")
        with atomic.atomic_directory(tmp_path / "bundle") as staging:
            write_bundle(staging, 1)
        left = set(os.listdir(tmp_path)) - {"bundle"}
        assert left == {names[k] for k in ("live", "own", "other-host", "not-ours")}
    finally:
        alive.kill()
        alive.wait()


def test_legacy_temporaries_inside_the_bundle_are_dropped(tmp_path):
    target = tmp_path / "bundle"
    (target / ".tmp-save-abcd1234").mkdir(parents=True)
    (target / ".tmp-abcd_123.safetensors").write_bytes(b"torn")
    with atomic.atomic_directory(target) as staging:
        write_bundle(staging, 1)
    assert temporaries(str(tmp_path)) == []


BAD_TARGETS = [
    pytest.param(lambda tmp: tmp / "file.txt", ValueError, r"is a file, not a directory", id="a-file"),
    pytest.param(lambda tmp: tmp / "dangling", ValueError, r"symbolic link to .* which does not exist", id="dangling"),
    pytest.param(lambda tmp: tmp / "link-to-file", ValueError, r"is a file, not a directory", id="link-to-a-file"),
    pytest.param(lambda tmp: "/", ValueError, r"is the root of the file system", id="root"),
    pytest.param(lambda tmp: "", ValueError, r"must not be empty", id="empty"),
    pytest.param(lambda tmp: 3, TypeError, r"must be a path \(str or os.PathLike\), got int", id="int"),
    pytest.param(lambda tmp: None, TypeError, r"must be a path.*got NoneType", id="none"),
]  # fmt: skip


@pytest.mark.parametrize("make_target, error, match", BAD_TARGETS)
def test_bad_targets_are_refused_before_anything_is_written(tmp_path, make_target, error, match):
    (tmp_path / "file.txt").write_text("keep me")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    (tmp_path / "link-to-file").symlink_to(tmp_path / "file.txt")
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(error, match=match):
        with atomic.atomic_directory(make_target(tmp_path)) as staging:
            write_bundle(staging, 1)
    assert sorted(os.listdir(tmp_path)) == before and (tmp_path / "file.txt").read_text() == "keep me"


def test_keep_other_files_must_be_a_bool(tmp_path):
    with pytest.raises(TypeError, match="keep_other_files must be True or False, got 'no'"):
        atomic.AtomicDirectory(tmp_path / "bundle", keep_other_files="no")
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------------------------------------------------------------
# Permissions: what a plain open() / os.makedirs would give
# ---------------------------------------------------------------------------------------------------------------------
@pytest.fixture(params=[0o022, 0o077, 0o002])
def umask(request):
    previous = os.umask(request.param)
    yield request.param
    os.umask(previous)


def test_saved_files_and_folders_honour_the_umask(tmp_path, umask):
    import torch

    target = tmp_path / "bundle"
    with atomic.atomic_directory(target) as staging:
        write_bundle(staging, 1)
    atomic.atomic_write_text(str(target / "front.json"), "{}")
    atomic.atomic_save_safetensors({"w": torch.zeros(2)}, str(target / "task_heads.safetensors"))
    atomic.atomic_write_text(str(tmp_path / "new" / "deep" / "state.json"), "{}")
    file_mode, folder_mode = 0o666 & ~umask, 0o777 & ~umask
    for path in (target / "front.json", target / "task_heads.safetensors", tmp_path / "new/deep/state.json"):
        assert stat.S_IMODE(path.stat().st_mode) == file_mode, path
    assert stat.S_IMODE(target.stat().st_mode) == folder_mode
    # a re-save keeps the permissions the user gave the bundle folder
    os.chmod(target, 0o750)
    with atomic.atomic_directory(target) as staging:
        write_bundle(staging, 2)
    assert stat.S_IMODE(target.stat().st_mode) == 0o750
    expected = {0o022: (0o644, 0o755), 0o077: (0o600, 0o700), 0o002: (0o664, 0o775)}[umask]
    assert (file_mode, folder_mode) == expected


def test_single_file_writes_leave_no_temporaries_and_replace_atomically(tmp_path):
    import torch

    path = tmp_path / "state.json"
    for i in range(3):
        atomic.atomic_write_text(str(path), json.dumps({"i": i}))
    atomic.atomic_save_safetensors({"w": torch.ones(3)}, str(tmp_path / "w.safetensors"))
    assert json.loads(path.read_text()) == {"i": 2}
    assert sorted(os.listdir(tmp_path)) == ["state.json", "w.safetensors"]
    dead = (
        tmp_path / f".state.json.palora-tmp-{atomic._digest('state.json')}-{atomic._HOST}-{dead_pid()}-0-0000abcd.txt"
    )
    dead.write_text("torn")  # left by a writer killed before its rename
    atomic.atomic_write_text(str(path), "{}")
    assert sorted(os.listdir(tmp_path)) == ["state.json", "w.safetensors"]


def test_an_unwritable_parent_is_saved_file_by_file_with_a_warning(tmp_path, monkeypatch, caplog):
    target = tmp_path / "bundle"
    with atomic.atomic_directory(target) as staging:
        write_bundle(staging, 1)
    real_make_directory = atomic._make_directory

    def make_directory(parent, stem, kind):
        if parent == str(tmp_path):  # what os.mkdir says in a folder this process may not write to
            raise PermissionError(13, "Permission denied", parent)
        return real_make_directory(parent, stem, kind)

    monkeypatch.setattr(atomic, "_make_directory", make_directory)
    with caplog.at_level(logging.WARNING):
        with atomic.atomic_directory(target) as staging:
            assert os.path.dirname(staging) == str(target)
            write_bundle(staging, 2)
    assert "may not write to its parent" in caplog.text
    assert bundle_generation(read_from(str(target))) == 2 and temporaries(str(tmp_path)) == []
    with pytest.raises(PermissionError):  # a new bundle there cannot be made at all: the error is the system's
        atomic.AtomicDirectory(tmp_path / "new")


def test_files_written_by_any_writer_follow_the_umask(tmp_path, umask):
    """safetensors >= 0.8 creates its files -rw------- whatever the umask; a bundle's files must not depend on it."""
    import torch
    from safetensors.torch import save_file

    target = tmp_path / "bundle"
    with atomic.atomic_directory(target) as staging:
        save_file({"w": torch.zeros(2)}, os.path.join(staging, "adapter_model.safetensors"))
        Path(staging, "private.txt").write_text("x")
        os.chmod(os.path.join(staging, "private.txt"), 0o600)
        Path(staging, "run.sh").write_text("#!/bin/sh\n")
        os.chmod(os.path.join(staging, "run.sh"), 0o700)
    assert stat.S_IMODE((target / "adapter_model.safetensors").stat().st_mode) == 0o666 & ~umask
    assert stat.S_IMODE((target / "private.txt").stat().st_mode) == 0o666 & ~umask
    assert stat.S_IMODE((target / "run.sh").stat().st_mode) == 0o777 & ~umask
    # files the new save did not write keep their own mode (they are the old bundle's, linked)
    (target / "notes.txt").write_text("mine")
    os.chmod(target / "notes.txt", 0o600)
    with atomic.atomic_directory(target) as staging:
        write_bundle(staging, 1)
    assert stat.S_IMODE((target / "notes.txt").stat().st_mode) == 0o600


@pytest.mark.parametrize("umask", [0o022], indirect=True)
def test_a_saved_peft_bundle_follows_the_umask(tmp_path, umask):
    """``PeftModel.save_pretrained`` of a PaLoRA model: PEFT writes ``adapter_model.safetensors`` with safetensors."""
    model = tiny_models()[0]
    model.save_pretrained(str(tmp_path / "bundle"))
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert stat.S_IMODE((tmp_path / "bundle" / name).stat().st_mode) == 0o644, name
