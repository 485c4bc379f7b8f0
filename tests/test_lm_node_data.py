"""A deployment node's own file for a causal-LM task (node config `data-path`, issue 29):
texts only, tokenized and given targets exactly as the task's corpus rows are, trained
through the ClientApp's own handlers; a `label`, an empty file, a line without a text and
a text with nothing to predict are each refused in one line naming the file and line."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from flwr.app import Context, Message, RecordDict
from flwr.common import MessageType

import clients.node_data as node_data
from clients.node_data import own_example_count, training_data
from fedtune.config import load_config
from fedtune.data.predict_input import PredictInputError
from fedtune.task.lm import IGNORE
from tests.lm_fixtures import write_users

MAX_LENGTH = 16


@pytest.fixture(scope="module")
def lm_task(lm_folders, tmp_path_factory):
    """A causal-LM task on users' texts (tiny random Llama) and its training split's texts,
    row for row (the corpus path's rows, read as the task reads them)."""
    from fedtune.config.runtime import runtime_settings
    from fedtune.data import load_corpus
    from fedtune.task.kinds import task_kind
    from fedtune.task.task import get_task

    data = write_users(tmp_path_factory.mktemp("users") / "mail.jsonl")
    cfg = load_config(None, [
        f'model.backbone="{lm_folders["llama"]}"', "task.kind=causal_lm", "data.corpus=hf",
        f'data.options={{path="json", data_files="{data}", test_fraction=0.25}}',
        "data.partition=natural", "data.by=user", "data.num_clients=3",
        "train.clients_per_round=2", f"model.max_length={MAX_LENGTH}", "tuning.method=lora",
        "train.local_steps=1", "train.batch_size=4", "privacy.sample.enabled=true",
        "privacy.sample.noise_multiplier=1.0", "privacy.disclose_counts=true"])
    task = get_task(cfg)
    corpus = load_corpus(cfg.data.corpus, cache_root=runtime_settings(cfg).cache_dir,
                         unlabelled=True, **cfg.data.options)
    train = task_kind(cfg.task.kind).select_rows(corpus, cfg)["train"]
    assert len(train) == len(task.train)
    return task, list(train["text"])


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _node(file: Path, partition: int = 0) -> dict[str, object]:
    return {"partition-id": partition, "data-path": str(file)}


def _one_line(info: pytest.ExceptionInfo) -> str:
    message = str(info.value)
    assert "\n" not in message, message
    return message


def test_an_lm_nodes_own_file_gives_the_tensors_of_the_same_texts_in_the_corpus(
        lm_task, tmp_path):
    """A node holding partition 0's texts in its own file trains on exactly the tensors the
    corpus path gives that partition: right padding, max_length, next-token targets."""
    task, texts = lm_task
    rows = task.partitions[0]
    own = _write(tmp_path / "mine.jsonl", [{"text": texts[int(i)]} for i in rows])
    node = _node(own)
    assert own_example_count(node, task) == len(rows)
    got = training_data(node, task, 0, len(rows)).tensors
    want = task.client_data(0).tensors
    assert len(got) == len(want) == 3
    for mine, corpus in zip(got, want, strict=True):
        assert mine.dtype == corpus.dtype == torch.int64
        assert torch.equal(mine, corpus)
    ids, mask, labels = got
    assert labels.shape == ids.shape == (len(rows), MAX_LENGTH)
    assert (labels[mask == 0] == IGNORE).all() and torch.equal(labels[mask == 1],
                                                               ids[mask == 1])
    # right padding: no real token after a pad
    assert not (mask[:, 1:] > mask[:, :-1]).any()
    # Extra fields (a user column) are ignored, as on the corpus path.
    with_user = _write(tmp_path / "user.jsonl",
                       [{"text": texts[int(i)], "user": "alice"} for i in rows])
    assert torch.equal(training_data(_node(with_user), task, 0, len(rows)).tensors[2],
                       want[2])


@pytest.mark.usefixtures("task_identity")
def test_an_lm_nodes_own_file_trains_through_the_clientapps_handlers(lm_task, tmp_path):
    """Discovery reports the file's count; the train handler the ClientApp calls takes one
    DP-SGD step on it: a finite loss and a non-zero delta; a changed file is refused."""
    import clients.handlers as client_app
    from fedtune.wire.delta import decode
    from fedtune.wire.protocol import (
        PartitionQuery,
        PartitionReply,
        TrainInstruction,
        TrainReply,
    )

    task, texts = lm_task
    cfg = task.cfg
    own = _write(tmp_path / "mine.jsonl", [{"text": t} for t in texts[:10]])
    context = Context(run_id=1, node_id=1, node_config=_node(own, 1), state=RecordDict(),
                      run_config={})
    query = Message(content=PartitionQuery().to_record(), message_type=MessageType.QUERY,
                    dst_node_id=1)
    claim = PartitionReply.from_record(client_app.handle_query(query, context, cfg).content,
                                       cfg.data.num_clients)
    assert claim == PartitionReply(1, 10)

    vector = task.initial_vector()
    order = TrainInstruction(vector=vector, server_round=1, lr=cfg.train.lr,
                             spec_hash=task.spec.hash, examples=claim.own_examples)
    train = Message(content=order.to_record(), message_type=MessageType.TRAIN, dst_node_id=1)
    answer = client_app.handle_train(train, context, cfg)
    assert not answer.has_error(), answer.error.reason
    reply = TrainReply.from_record(answer.content)
    delta = decode(reply.delta, task.spec)
    assert reply.report.steps == 1 and reply.dp is not None and reply.dp.steps == 1
    assert reply.report.num_examples == 10 and np.isfinite(reply.report.loss)
    assert np.isfinite(delta).all() and np.abs(delta).max() > 0

    # One more line after discovery: the count the server charges by no longer holds.
    _write(own, [{"text": t} for t in texts[:11]])
    answer = client_app.handle_train(train, context, cfg)
    assert answer.has_error() and "holds 11 training examples" in answer.error.reason


# --- refusals: one line naming the file (and line) --------------------------------------

@pytest.fixture()
def text_task():
    """Just what reading a node's file needs of an LM task: its config and its prepared
    tokenizer (the packaged MiniLM one, padded on the right), no model."""
    from transformers import AutoTokenizer

    from fedtune.models.backbone import resolve_backbone_path
    from fedtune.task.lm import prepare_tokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve_backbone_path("minilm"))
    prepare_tokenizer(tokenizer)
    cfg = load_config(None, ["task.kind=causal_lm", "data.partition=iid",
                             f"model.max_length={MAX_LENGTH}"])
    return SimpleNamespace(cfg=cfg, label_names=(),
                           backbone=SimpleNamespace(tokenizer=tokenizer, hash="h"))


@pytest.mark.parametrize("content, needle", [
    ('{"text": "hello there"}\n{"text": "buy now", "label": "spam"}\n',
     ':2: a "label" (\'spam\') in a task.kind=\'causal_lm\' node\'s file'),
    ('{"text": "hello", "label": 0}\n', ':1: a "label" (0)'),
    ("", " holds no texts"),
    ("\n  \n", " holds no texts"),
    ('{"body": "no text column"}\n{"body": "x"}\n', ':1: expected an object with a "text"'),
    ('{"text": "fine"}\n\n{"user": "bob"}\n', ':3: expected an object with a "text"'),
    ('{"text": "fine"}\n{"text": 7}\n', ':2: expected an object with a "text"'),
    ('{"text": "fine"}\n{"text": "   "}\n', ':2: an empty "text"'),
    ('{"text": "fine"}\nnot json\n', ":2: not JSON"),
])
def test_an_lm_nodes_bad_file_is_refused_in_one_line_naming_it(text_task, tmp_path, content,
                                                                 needle):
    own = tmp_path / "mine.jsonl"
    own.write_text(content)
    with pytest.raises(PredictInputError) as info:
        own_example_count(_node(own), text_task)
    message = _one_line(info)
    assert f"{own}{needle}" in message, message


def test_an_lm_nodes_file_of_another_format_names_the_lm_line_format(text_task, tmp_path):
    own = tmp_path / "mine.csv"
    own.write_text("text\nhello\n")
    with pytest.raises(PredictInputError) as info:
        own_example_count(_node(own), text_task)
    assert _one_line(info).endswith('expected a .jsonl file of {"text": ...} lines')


def test_a_text_with_no_next_token_is_refused_by_its_line(text_task, tmp_path, monkeypatch):
    """A tokenizer that adds no special token (GPT-2's, SmolLM2's) makes a one-word text a
    single token: nothing to predict, yet an example the server would charge for."""
    tokenizer = text_task.backbone.tokenizer
    monkeypatch.setattr(node_data, "tokenize_texts", lambda texts, tok, length: tokenizer(
        texts, max_length=length, truncation=True, padding="max_length", return_tensors="np",
        add_special_tokens=False))
    own = _write(tmp_path / "mine.jsonl", [{"text": "hello there"}, {"text": "hello"},
                                           {"text": "ok see you"}, {"text": "bye"}])
    with pytest.raises(PredictInputError) as info:
        own_example_count(_node(own), text_task)
    message = _one_line(info)
    assert f"{own}:2: the text is one token within model.max_length={MAX_LENGTH}" in message
    assert "(2 such lines)" in message


def test_a_classifier_nodes_file_still_needs_its_labels(text_task, tmp_path):
    """The classification path is unchanged: labels by name or id become the targets, and
    a file without labels is refused."""
    cfg = load_config(None, [f"model.max_length={MAX_LENGTH}"])
    task = SimpleNamespace(cfg=cfg, label_names=("ham", "spam"), backbone=text_task.backbone)
    own = _write(tmp_path / "mine.jsonl", [{"text": "hello", "label": "ham"},
                                           {"text": "buy now", "label": 1}])
    ids, mask, labels = training_data(_node(own), task, 0, 2).tensors
    assert labels.tolist() == [0, 1] and ids.shape == mask.shape == (2, MAX_LENGTH)
    bare = _write(tmp_path / "bare.jsonl", [{"text": "hello"}])
    with pytest.raises(PredictInputError, match=r'bare.jsonl: every line needs a "label"'):
        own_example_count(_node(bare), task)


@pytest.mark.usefixtures("task_identity")
def test_a_round_with_an_lm_node_on_its_own_file(lm_task, tmp_path, monkeypatch):
    """The real ServerApp round loop (discovery, DP plan, round, evaluation) driving the
    real ClientApp handlers in process (no Ray, no SuperLink), node 1 on its own texts:
    the server holds, weights and reports it by the count it reported."""
    from inline_grid import inline_run

    task, texts = lm_task
    cfg = load_config(None, [f"{key}={value}" for key, value in (
        ("model.backbone", f'"{task.cfg.model.backbone}"'), ("task.kind", "causal_lm"),
        ("data.corpus", "hf"), ("data.partition", "natural"), ("data.by", "user"),
        ("data.num_clients", "3"), ("train.clients_per_round", "3"),
        ("model.max_length", str(MAX_LENGTH)), ("tuning.method", "lora"),
        ("train.rounds", "1"), ("train.local_steps", "1"), ("train.batch_size", "4"),
        ("train.eval_max_examples", "16"), ("task.generation_examples", "0"),
        ("privacy.disclose_counts", "true"), ("train.round_timeout_s", "60"))]
        + [f"data.options={{path=\"json\", data_files=\"{task.cfg.data.options['data_files']}\""
           ", test_fraction=0.25}"])
    own = _write(tmp_path / "mine.jsonl", [{"text": t} for t in texts[:10]])
    summary, _, _ = inline_run(cfg, tmp_path / "run", monkeypatch,
                               node_configs={1: {"data-path": str(own)}})
    (record,) = [json.loads(x) for x in (tmp_path / "run/rounds.jsonl").read_text()
                 .splitlines()]
    by_pid = {c["partition_id"]: c for c in record["per_client"]}
    assert sorted(by_pid) == [0, 1, 2] and not record["failed"] and not record["rejected"]
    assert by_pid[1]["num_examples"] == 10
    assert by_pid[0]["num_examples"] == len(task.partitions[0])
    assert record["val_perplexity"] is not None and np.isfinite(record["val_perplexity"])
    assert summary["test_perplexity"] is not None and summary["epsilon_sample"] is not None
