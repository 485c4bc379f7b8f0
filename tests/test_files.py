"""Files fedtune writes for a user: certificates and keys never replace what exists unless
asked, never write through a symlink, and private keys are never readable by others."""

import os
import stat

import pytest

from fedtune.deploy.certs import CertsError, main, write_certs, write_node_key

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
    from fedtune.run_folder import RunFolderError, claim_run_folder

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
    from fedtune.ledger import Ledger, write_text_atomic

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
