"""Files fedtune writes for a user: certificates and keys never replace what exists unless
asked, never write through a symlink (nor do run, export and sweep folders), and private
keys are never readable by others."""

import os
import shutil
import stat
import threading
from pathlib import Path

import pytest

from fedtune.deploy.certs import CertsError, main, write_certs, write_node_key
from fedtune.run.atomic import append_line, write_atomic
from fedtune.run.curator_log import append_curator
from fedtune.run.folder import CURATOR_FILE, RunFolderError, claim_run_folder
from fedtune.study import sweep as sweep_mod

EVERY_FILE = ("ca.crt", "ca.key", "server.pem", "server.key", "node-0", "node-0.pub")


def _contents(folder):
    return {name: (folder / name).read_bytes() for name in EVERY_FILE}


def test_existing_certificates_are_not_replaced_without_force(tmp_path):
    write_certs(tmp_path, nodes=1)
    before = _contents(tmp_path)
    with pytest.raises(CertsError) as info:
        write_certs(tmp_path, nodes=1)
    message = str(info.value)
    assert "\n" not in message and "--force" in message
    assert str(tmp_path / "ca.crt") in message and str(tmp_path / "ca.key") in message
    assert _contents(tmp_path) == before  # nothing was touched


def test_force_replaces_every_file(tmp_path):
    write_certs(tmp_path, nodes=1)
    before = _contents(tmp_path)
    write_certs(tmp_path, nodes=1, force=True)
    after = _contents(tmp_path)
    assert all(after[name] != before[name] for name in EVERY_FILE)


def test_a_single_existing_node_key_blocks_the_whole_write(tmp_path):
    write_node_key(tmp_path / "node-1")
    with pytest.raises(CertsError, match="node-1"):
        write_certs(tmp_path, nodes=2)
    assert not (tmp_path / "ca.crt").exists()


@pytest.mark.parametrize("force", [False, True])
def test_symlinks_are_never_written_through(tmp_path, force):
    folder, outside = tmp_path / "certs", tmp_path / "outside"
    folder.mkdir()
    outside.mkdir()
    (outside / "victim").write_text("keep me")
    (folder / "ca.crt").symlink_to(outside / "victim")
    (folder / "server.key").symlink_to(outside / "planted")  # dangling: would be created
    if not force:
        with pytest.raises(CertsError, match="ca.crt"):
            write_certs(folder, nodes=0)
    else:
        write_certs(folder, nodes=0, force=True)
        assert not (folder / "ca.crt").is_symlink() and not (folder / "server.key").is_symlink()
        assert (folder / "ca.crt").read_bytes().startswith(b"-----BEGIN CERTIFICATE")
    assert (outside / "victim").read_text() == "keep me"
    assert not (outside / "planted").exists()


def test_private_keys_are_created_0600_with_no_chmod_afterwards(tmp_path, monkeypatch):
    # Keys were written 0644 (umask 022) and chmod-ed after: readable in between. With every
    # chmod disabled and a permissive umask, each key must still be born 0600.
    def no_chmod(*args, **kwargs):
        raise AssertionError("a key file was chmod-ed after it was created")

    monkeypatch.setattr(os, "chmod", no_chmod)
    monkeypatch.setattr(os, "fchmod", no_chmod)
    old = os.umask(0)
    try:
        files = write_certs(tmp_path, nodes=1)
    finally:
        os.umask(old)
    for path in (tmp_path / "ca.key", files.server_key, *files.node_keys):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    for path in (files.ca_cert, files.server_cert, tmp_path / "node-0.pub"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path


def test_module_entry_point_refuses_then_forces(tmp_path, capsys):
    main([str(tmp_path), "--nodes", "1"])
    with pytest.raises(SystemExit) as info:
        main([str(tmp_path), "--nodes", "1"])
    assert info.value.code == 2 and "--force" in capsys.readouterr().err
    main([str(tmp_path), "--nodes", "1", "--force"])


# --- run folders: planted symlinks are refused, never followed (THREATS.md 7; issue 27 #6) ---

def _plant(out, outside):
    out.mkdir()
    for name in ("config.toml", "rounds.jsonl"):
        os.symlink(outside / name, out / name)  # dangling: the targets do not exist yet


@pytest.mark.parametrize("resume", [False, True])
def test_a_run_folder_with_planted_links_is_refused(tmp_path, resume):
    from fedtune.run.folder import RunFolderError, claim_run_folder

    outside = tmp_path / "outside"
    outside.mkdir()
    _plant(tmp_path / "out", outside)
    with pytest.raises(RunFolderError) as info:
        claim_run_folder(tmp_path / "out", resume=resume)
    message = str(info.value)
    assert "symlinks ('config.toml', 'rounds.jsonl')" in message and "\n" not in message
    assert list(outside.iterdir()) == []
    os.symlink(tmp_path / "real", tmp_path / "link-out")
    with pytest.raises(RunFolderError, match="is a symlink"):
        claim_run_folder(tmp_path / "link-out", resume=resume)


def test_ledger_writes_never_follow_a_link_planted_after_the_claim(tmp_path):
    from fedtune.run.atomic import write_text_atomic
    from fedtune.run.ledger import Ledger

    outside = tmp_path / "outside"
    outside.mkdir()
    _plant(tmp_path / "out", outside)
    ledger = Ledger(tmp_path / "out")
    with pytest.raises(OSError):  # ELOOP: O_NOFOLLOW refuses the planted rounds.jsonl
        ledger.append_round({"round": 1})
    # A whole-file write replaces the link (config.toml, summary.json) instead of following
    # it, also when the temp file's name was planted as a link.
    os.symlink(outside / "tmp-target", tmp_path / "out" / "config.toml.tmp")
    write_text_atomic(tmp_path / "out" / "config.toml", "name = 'x'\n")
    assert not (tmp_path / "out" / "config.toml").is_symlink()
    assert (tmp_path / "out" / "config.toml").read_text() == "name = 'x'\n"
    ledger.write_summary({"ok": True})
    assert list(outside.iterdir()) == []


# --- sweep, export and the peft adapter never write through a planted link ----------------
# (moved here from the attack's tests/test_attack_files.py, assertions kept)

def _victim(tmp_path: Path) -> Path:
    victim = tmp_path / "outside" / "victim.txt"
    victim.parent.mkdir()
    victim.write_text("precious\n")
    return victim


def test_sweep_never_writes_through_planted_link(tmp_path: Path, monkeypatch) -> None:
    """A sweep's log/sweep files under its --out are never written through a planted link."""
    out = tmp_path / "sweep"
    (out / "v1").mkdir(parents=True)
    victim = _victim(tmp_path)
    os.symlink(victim, out / "v1" / sweep_mod.SWEEP_LOG)

    class Dead:
        returncode = 1

        def poll(self) -> int:
            return 1

    def launch(*args, stdout, **kwargs) -> Dead:
        stdout.write("the variant's output\n")  # what the real child writes to the log
        stdout.flush()
        return Dead()

    monkeypatch.setattr(sweep_mod.subprocess, "Popen", launch)
    spec = sweep_mod.Sweep(name="s", base=tmp_path / "base.toml",
                           variants=(sweep_mod.Variant(name="v1", overrides=()),))
    try:
        sweep_mod.run_sweep(spec, out, poll_s=0.0)
    except (RuntimeError, OSError):
        pass
    assert victim.read_text() == "precious\n"


def test_export_never_writes_through_a_symlinked_out_folder(tmp_path: Path, monkeypatch) -> None:
    """`fedtune export RUN OUT` refuses an OUT that is a symlink (as `fedtune run --out` does)."""
    from types import SimpleNamespace

    import torch
    from safetensors.torch import save_file

    from fedtune.config import load_config
    from fedtune.run import export as export_mod

    run = tmp_path / "run"
    run.mkdir()
    save_file({"w": torch.zeros(2)}, str(run / export_mod.STATE_FILE), metadata={})
    (run / export_mod.CONFIG_FILE).write_text("")
    cfg = load_config(None, [])
    spec = SimpleNamespace(backbone_hash="b", hash="h", names=["w"], shapes=[(2,)],
                           dtypes=["float32"])
    monkeypatch.setattr(export_mod, "load_tuned", lambda folder: SimpleNamespace(
        cfg=cfg, spec=spec, label_names=("a", "b")))
    elsewhere = tmp_path / "outside"
    elsewhere.mkdir()
    link = tmp_path / "export"
    os.symlink(elsewhere, link)
    try:
        export_mod.export_run(run, link)
    except (export_mod.ExportError, OSError):
        pass
    assert list(elsewhere.iterdir()) == []


def test_the_peft_adapter_is_never_written_through_a_link_planted_in_out(tmp_path: Path) -> None:
    """A link planted inside --out/adapter/ (a folder: the claim scans the top level only) is
    not followed when the run saves its adapter."""
    from types import SimpleNamespace

    import peft
    import torch
    from torch import nn

    from fedtune.run.export import ADAPTER_DIR, save_tuned_state

    out = tmp_path / "run"
    (out / ADAPTER_DIR).mkdir(parents=True)
    victim = _victim(tmp_path)
    os.symlink(victim, out / ADAPTER_DIR / "adapter_config.json")
    base = nn.Sequential(nn.Linear(4, 4))
    backbone = peft.get_peft_model(base, peft.LoraConfig(r=2, target_modules=["0"]))
    model = SimpleNamespace(method="lora", backbone=backbone,
                            load_trainable=lambda tensors: None)
    spec = SimpleNamespace(hash="h", backbone_hash="b")
    try:
        save_tuned_state(out, model, spec, {"w": torch.zeros(2)}, ("a", "b"))
    except OSError:
        pass
    assert victim.read_text() == "precious\n"


def test_sweep_refuses_a_symlinked_variant_folder(tmp_path: Path, monkeypatch) -> None:
    out = tmp_path / "sweep"
    out.mkdir()
    elsewhere = tmp_path / "outside"
    elsewhere.mkdir()
    os.symlink(elsewhere, out / "v1")
    monkeypatch.setattr(sweep_mod.subprocess, "Popen", lambda *a, **k: pytest.fail("ran"))
    spec = sweep_mod.Sweep(name="s", base=tmp_path / "base.toml",
                           variants=(sweep_mod.Variant(name="v1", overrides=()),))
    with pytest.raises(RuntimeError, match="is a symlink") as info:
        sweep_mod.run_sweep(spec, out, poll_s=0.0)
    assert "\n" not in str(info.value)
    assert list(elsewhere.iterdir()) == []


@pytest.mark.parametrize("resume", [False, True])
def test_a_link_nested_anywhere_in_the_run_folder_is_refused(tmp_path, resume):
    from fedtune.run.folder import RunFolderError, claim_run_folder

    outside = tmp_path / "outside"
    outside.mkdir()
    (tmp_path / "out" / "adapter" / "deep").mkdir(parents=True)
    os.symlink(outside / "x", tmp_path / "out" / "adapter" / "deep" / "adapter_config.json")
    if not resume:
        os.rename(tmp_path / "out" / "adapter", tmp_path / "out" / "other")
    with pytest.raises(RunFolderError, match="holds symlinks") as info:
        claim_run_folder(tmp_path / "out", resume=resume)
    assert "adapter_config.json" in str(info.value) and "\n" not in str(info.value)
    assert list(outside.iterdir()) == []


def test_the_link_walk_is_bounded(tmp_path, monkeypatch):
    from fedtune.run import folder as run_folder
    from fedtune.run.folder import RunFolderError, claim_run_folder

    monkeypatch.setattr(run_folder, "MAX_TREE_ENTRIES", 5)
    for i in range(3):
        (tmp_path / "out" / f"d{i}" / "e").mkdir(parents=True)
    with pytest.raises(RunFolderError, match="more than 5 entries"):
        claim_run_folder(tmp_path / "out", resume=True)


def test_a_folder_write_replaces_a_planted_link_and_leaves_its_target(tmp_path):
    from fedtune.run.atomic import write_folder_atomic

    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep").write_text("precious\n")
    (tmp_path / "out").mkdir()
    os.symlink(outside, tmp_path / "out" / "adapter")
    write_folder_atomic(tmp_path / "out" / "adapter",
                        lambda tmp: (tmp / "adapter_config.json").write_text("{}"))
    adapter = tmp_path / "out" / "adapter"
    assert adapter.is_dir() and not adapter.is_symlink()
    assert [p.name for p in adapter.iterdir()] == ["adapter_config.json"]
    assert [p.name for p in outside.iterdir()] == ["keep"]
    assert (outside / "keep").read_text() == "precious\n"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["adapter"]  # no temp left


def test_a_folder_is_filled_private_and_then_gets_the_umask_mode(tmp_path):
    """The temp folder a library writes into by name is 0700 while it fills (no other user
    plants a link in it); once in place the folder has what a plain mkdir gives."""
    from fedtune.run.atomic import write_folder_atomic

    seen = {}
    old = os.umask(0o002)
    try:
        write_folder_atomic(tmp_path / "adapter",
                            lambda tmp: seen.setdefault("mode", os.lstat(tmp).st_mode & 0o777))
        write_folder_atomic(tmp_path / "entry", lambda tmp: None, mode=0o755)
    finally:
        os.umask(old)
    assert seen["mode"] == 0o700
    assert os.lstat(tmp_path / "adapter").st_mode & 0o777 == 0o775
    assert os.lstat(tmp_path / "entry").st_mode & 0o777 == 0o755


def test_an_export_holds_no_lock_file_and_a_second_export_is_refused(tmp_path, monkeypatch):
    from types import SimpleNamespace

    import torch
    from safetensors.torch import save_file

    from fedtune.config import load_config
    from fedtune.run import export as export_mod

    run = tmp_path / "run"
    run.mkdir()
    save_file({"w": torch.zeros(2)}, str(run / export_mod.STATE_FILE), metadata={})
    (run / export_mod.CONFIG_FILE).write_text("")
    spec = SimpleNamespace(backbone_hash="b", hash="h", names=["w"], shapes=[(2,)],
                           dtypes=["float32"])
    # The loaded model: the export checks the state it ships holds its tensors.
    model = SimpleNamespace(trainable_state=lambda: {"w": torch.zeros(2)}, backbone=None)
    monkeypatch.setattr(export_mod, "load_tuned", lambda folder: SimpleNamespace(
        cfg=load_config(None, []), spec=spec, label_names=("a", "b"), model=model))
    out = export_mod.export_run(run, tmp_path / "export")
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [export_mod.STATE_FILE, export_mod.CONFIG_FILE, export_mod.MANIFEST_FILE])
    with pytest.raises(export_mod.ExportError, match="not empty"):
        export_mod.export_run(run, out)



# --- FIX28A: what is written in place is the folder's own regular file --------------------

def test_a_lock_file_planted_as_a_hard_link_or_fifo_is_refused_never_truncated(tmp_path):
    from fedtune.run.folder import LOCK_FILE, RunFolderError, claim_run_folder

    outside = tmp_path / "outside.txt"
    outside.write_text("the planter's victim")
    out = tmp_path / "out"
    out.mkdir()
    os.link(outside, out / LOCK_FILE)  # the claim truncates and writes its pid into the lock
    with pytest.raises(RunFolderError, match="hard links") as info:
        claim_run_folder(out)
    assert "\n" not in str(info.value) and LOCK_FILE in str(info.value)
    assert outside.read_text() == "the planter's victim"
    (out / LOCK_FILE).unlink()
    os.mkfifo(out / LOCK_FILE)
    with pytest.raises(RunFolderError, match="not a regular file"):
        claim_run_folder(out)


def test_append_line_refuses_a_hard_linked_log_on_resume_with_one_line(tmp_path):
    from fedtune.run.atomic import UnsafeFileError, append_line
    from fedtune.run.folder import ROUNDS_FILE

    outside = tmp_path / "outside.jsonl"
    outside.write_text("")
    os.link(outside, tmp_path / ROUNDS_FILE)  # an existing folder: the claim's names pass
    with pytest.raises(UnsafeFileError) as info:
        append_line(tmp_path / ROUNDS_FILE, '{"round": 1}')
    assert str(tmp_path / ROUNDS_FILE) in str(info.value) and "\n" not in str(info.value)
    assert outside.read_text() == ""
    append_line(tmp_path / "own.jsonl", "a")  # a file of its own is appended as before
    assert (tmp_path / "own.jsonl").read_text() == "a\n"


def _safetensors_parts(raw: bytes) -> tuple[dict, bytes]:
    import json
    import struct

    size = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8:8 + size]), raw[8 + size:]


def test_safetensors_bytes_are_the_file_save_file_writes(tmp_path):
    """The checkpoint and the final state are written from safetensors' `save` bytes: the
    same file as `save_file` (golden hashes of both stay as they were). With one metadata
    key (the checkpoint's) the bytes are identical; with several (the final state's) both
    writers order the header's metadata as a Rust HashMap iterates, so the same header
    and the same tensor bytes are compared (benchmarks/golden.py hashes exactly these)."""
    import torch
    from safetensors.torch import save, save_file

    tensors = {"vector": torch.randn(257), "torch_rng": torch.random.get_rng_state(),
               "keys": torch.arange(7, dtype=torch.int64)}
    one = {"fedtune": '{"round": 3}'}
    save_file(tensors, tmp_path / "one.safetensors", metadata=one)
    assert save(tensors, metadata=one) == (tmp_path / "one.safetensors").read_bytes()
    several = {**one, "format": "x", "spec_hash": "abc"}
    save_file(tensors, tmp_path / "several.safetensors", metadata=several)
    by_name = _safetensors_parts((tmp_path / "several.safetensors").read_bytes())
    assert _safetensors_parts(save(tensors, metadata=several)) == by_name


def _report_run(run: Path) -> None:
    import json

    from fedtune.config import load_config

    run.mkdir()
    (run / "config.toml").write_text(load_config(None).to_toml())
    (run / "rounds.jsonl").write_text(json.dumps({"round": 1, "accuracy": 0.5,
                                                  "bytes_up": 10}) + "\n")
    (run / "summary.json").write_text(json.dumps({"final_accuracy": 0.5, "epsilon_sample": 1.0,
                                                  "epsilon_user": None}))


def test_fedtune_report_refuses_a_linked_out_in_one_line_and_rewrites_its_own(tmp_path):
    from typer.testing import CliRunner

    from fedtune.cli import app
    from fedtune.run.folder import LOCK_FILE, REPORT_FILE

    run = tmp_path / "run"
    _report_run(run)
    victim = tmp_path / "victim"
    victim.mkdir()
    (run / "report").symlink_to(victim)
    result = CliRunner().invoke(app, ["report", str(run)])  # the default: RUN/report
    assert result.exit_code == 2 and "is a symlink" in result.output, result.output
    assert "Traceback" not in result.output and list(victim.iterdir()) == []
    (run / "report").unlink()
    for _ in range(2):  # a report folder of its own is written, then rewritten
        result = CliRunner().invoke(app, ["report", str(run)])
        assert result.exit_code == 0, result.output
    assert (run / "report" / REPORT_FILE).is_file() and not (run / "report" / LOCK_FILE).exists()


# Moved here from tests/test_attack28_files.py (a review's reproducers, assertions kept): ATTACK28
# (issue 28, target 2): the one atomic writer and the run folder's appended logs,

SECRET = {"round": 1, "per_client": [{"partition_id": 3, "node": 103, "loss": 0.25}]}


def test_a_new_run_never_appends_the_curator_log_into_a_planted_hardlink(tmp_path: Path):
    """A hardlink planted as curator_log.jsonl in a fresh --out never receives the curator's log."""
    outside = tmp_path / "attacker-readable.txt"  # e.g. a world-readable file of the planter
    outside.write_text("")
    out = tmp_path / "run"
    out.mkdir()
    os.link(outside, out / CURATOR_FILE)  # not a symlink: refuse_links and O_NOFOLLOW miss it
    try:
        folder = claim_run_folder(out)
    except RunFolderError:
        return  # refusing the planted file is one way to hold
    with folder:
        try:
            append_curator(out, SECRET)
        except OSError:
            pass  # refusing to append into a multiply-linked file is another
    assert outside.read_text() == "", "the curator's secret log was written outside --out"


def test_append_line_never_blocks_on_a_planted_fifo(tmp_path: Path):
    """append_line (rounds.jsonl, curator_log.jsonl) refuses a FIFO; never hangs or feeds it."""
    fifo = tmp_path / CURATOR_FILE
    os.mkfifo(fifo)
    outcome: list[object] = []

    def write() -> None:
        try:
            append_line(fifo, "secret cohort line", mode=0o600)
            outcome.append("written")
        except OSError as exc:
            outcome.append(exc)

    thread = threading.Thread(target=write, daemon=True)
    thread.start()
    thread.join(3.0)
    blocked = thread.is_alive()
    if blocked:  # a reader (the planter) opens the FIFO: the blocked writer hands it the line
        reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
        thread.join(3.0)
        os.close(reader)
    assert not blocked, "append_line blocked on a FIFO (the run hangs; a reader gets the log)"
    assert outcome and isinstance(outcome[0], OSError), f"append_line wrote into a FIFO: {outcome}"


def test_write_atomic_by_name_never_writes_through_a_swapped_temp_name(tmp_path: Path):
    """write_atomic by name never writes outside the folder when its temp name is swapped."""
    out = tmp_path / "run"
    out.mkdir()
    victim = tmp_path / "outside.txt"
    victim.write_text("untouched")
    source = tmp_path / "state.bin"
    source.write_bytes(b"tensors")

    def racer_then_library_writer(tmp: str) -> None:
        # Someone with write access to the folder wins the race between _fresh_temp's
        # O_EXCL create (closed at once) and the library opening the name again.
        os.unlink(tmp)
        os.symlink(victim, tmp)
        shutil.copyfile(source, tmp)  # what export's writer does (save_file alike)

    # FIX28A: the by-name form is gone (writers hand bytes or write into the writer's own
    # file object), so handing a name-writer is refused before any temp file exists: a
    # TypeError, not an OSError. The racer never runs and nothing lands in the folder.
    with pytest.raises((OSError, TypeError)):
        write_atomic(out / "final_state.safetensors", racer_then_library_writer)
    assert victim.read_text() == "untouched", "write_atomic wrote through the swapped temp name"
    assert list(out.iterdir()) == [], "a temp file or a planted link was left in the folder"


def test_fedtune_report_never_writes_through_a_link_planted_in_the_run_folder(tmp_path: Path):
    """`fedtune report RUN` never writes through a link planted as RUN/report (its default)."""
    from fedtune.study.report import write_report

    run = tmp_path / "shared-run"
    run.mkdir()
    elsewhere = tmp_path / "victim-folder"
    elsewhere.mkdir()
    (run / "report").symlink_to(elsewhere)  # planted by whoever shared the run folder
    try:
        write_report([], run / "report")
    except (OSError, ValueError, RuntimeError):
        pass  # refusing the link holds
    assert list(elsewhere.iterdir()) == [], "the report was written through a planted link"
