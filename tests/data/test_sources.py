"""Input containers: CSV / TSV, Parquet files and Hub folders, datasets save_to_disk folders, beside JSON(L);
--columns maps a container's columns to a layout's fields; positions and errors name the file and the row."""

import csv
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data import sources
from data.formats import RecordError, parse_record, where
from data.sources import InputFile

TQA = [{"Type": "Adversarial", "Question": f"What happens {i}, then?", "Best Answer": f"Nothing {i}.\nReally.",
        "Source": "https://example.org"} for i in range(5)]
MAPPING = {"instruction": "Question", "output": "Best Answer"}


def write_csv(path, rows, delimiter=","):
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]), delimiter=delimiter)
        writer.writeheader()
        writer.writerows(rows)
    return path


def records(path, container=None):
    source = InputFile(str(path), container or sources.container_of(str(path)))
    return list(sources.iter_records(source))


def test_csv_rows_are_dicts_numbered_by_their_first_line(tmp_path):
    path = write_csv(tmp_path / "tqa.csv", TQA)  # every answer spans two lines (a quoted line break)
    got = records(path)
    assert [line for line, _ in got] == [2, 4, 6, 8, 10]
    assert got[0][1] == TQA[0]
    messages, _ = parse_record(got[0][1], "alpaca", MAPPING)
    assert messages == [{"role": "user", "content": "What happens 0, then?"}, {"role": "assistant", "content": "Nothing 0.\nReally."}]


def test_bad_csv_rows_are_rejects_at_their_line(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_bytes(b"Question,Best Answer\r\nq1,a1\r\n\r\nonly one field\r\nq\xff,a\r\n\"q4\",\"a4\"\r\n")
    got = records(path)
    assert [line for line, _ in got] == [2, 4, 5, 6]
    kinds = [raw.reason if isinstance(raw, RecordError) else raw for _, raw in got]
    assert kinds == [{"Question": "q1", "Best Answer": "a1"}, "malformed_csv", "invalid_utf8", {"Question": "q4", "Best Answer": "a4"}]
    with pytest.raises(RecordError, match="1 fields, the header has 2"):
        parse_record(got[1][1], "alpaca", MAPPING)


def test_tsv_and_a_messages_column_of_json_text(tmp_path):
    rows = [{"id": "1", "chat": json.dumps([{"role": "user", "content": "hi\tthere"}, {"role": "assistant", "content": "yo"}])}]
    path = write_csv(tmp_path / "chats.tsv", rows, delimiter="\t")
    source = InputFile(str(path), "tsv")
    assert sources.container_of(str(path)) == "tsv"
    assert sources.detect_layout(source, "auto", {"messages": "chat"}) == "messages"
    (_, raw), = records(path)
    assert parse_record(raw, "messages", {"messages": "chat"})[0][0] == {"role": "user", "content": "hi\tthere"}
    with pytest.raises(RecordError) as info:
        parse_record({"chat": '[{"role": "user"'}, "messages", {"messages": "chat"})
    assert info.value.reason == "malformed_json" and info.value.detail.startswith("field 'messages': Expecting")


def test_parquet_rows_stream_by_row_group_with_their_row_index(tmp_path, monkeypatch):
    path = tmp_path / "t.parquet"
    pq.write_table(pa.Table.from_pylist([{"text": f"row {i}"} for i in range(50)]), path, row_group_size=10)
    source = InputFile(str(path), "parquet")
    assert sources.container_of(str(path)) == "parquet" and sources.row_count(source) == 50
    asked = []
    real = pq.ParquetFile.iter_batches
    monkeypatch.setattr(pq.ParquetFile, "iter_batches", lambda self, **kw: asked.append(kw["row_groups"]) or real(self, **kw))
    got = list(sources.read_rows(source, 23, 31))
    assert got == [(i, {"text": f"row {i}"}) for i in range(23, 31)]
    assert asked == [[2, 3]]  # only the row groups that hold the rows are read
    segments = list(sources.table_segments(source, shard_size=20, limit=45))
    assert [(first, last, n, span) for first, last, n, _, span in segments] == [(0, 19, 20, (0, 20)), (20, 39, 20, (20, 40)),
                                                                                (40, 44, 5, (40, 45))]
    assert where(str(path), 23) == f"{path} row 23"


def test_a_hub_folder_is_its_parquet_files_and_several_splits_are_refused(tmp_path):
    data = tmp_path / "hub" / "data"
    data.mkdir(parents=True)
    table = pa.Table.from_pylist(TQA)
    for i in range(2):
        pq.write_table(table, data / f"train-0000{i}-of-00002.parquet")
    (tmp_path / "hub" / "README.md").write_text("card")
    files = sources.expand(str(tmp_path / "hub"))
    assert [(f.path.rsplit("/", 1)[-1], f.container) for f in files] == [
        ("train-00000-of-00002.parquet", "parquet"), ("train-00001-of-00002.parquet", "parquet")]
    pq.write_table(table, data / "test-00000-of-00001.parquet")
    with pytest.raises(ValueError, match=r"holds several splits \(test: 1 file\(s\), .*train: 2 file\(s\).*--input .*train-00000"):
        sources.expand(str(tmp_path / "hub"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="a folder without input files"):
        sources.expand(str(tmp_path / "empty"))


def test_a_save_to_disk_folder_is_read_offline_and_a_dataset_dict_names_its_splits(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    import datasets

    chats = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]} for i in range(4)]
    ds = datasets.Dataset.from_list(chats)
    ds.save_to_disk(str(tmp_path / "saved"))
    (source,) = sources.expand(str(tmp_path / "saved"))
    assert source.container == "arrow" and source.path.endswith(".arrow")
    assert sources.detect_layout(source, "auto", None) == "messages"
    assert list(sources.read_rows(source, 1, 3)) == [(1, chats[1]), (2, chats[2])]
    datasets.DatasetDict({"train": ds, "test": ds}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(ValueError, match=r"DatasetDict folder with splits \['test', 'train'\]; give one split's folder, e.g. --input .*dd/train"):
        sources.expand(str(tmp_path / "dd"))


def test_auto_detection_after_mapping_and_its_errors(tmp_path):
    path = write_csv(tmp_path / "tqa.csv", TQA)
    source = InputFile(str(path), "csv")
    assert sources.detect_layout(source, "auto", MAPPING) == "alpaca"
    with pytest.raises(ValueError) as info:
        sources.detect_layout(source, "auto", None)
    said = str(info.value)
    assert "cannot tell the record layout (--format auto) from its columns ['Type', 'Question', 'Best Answer', 'Source']" in said
    for layout in ("alpaca    instruction, output", "lima", "messages  messages", "sharegpt", "text"):
        assert layout in said
    assert "--columns instruction=Question,output='Best Answer'" in said
    with pytest.raises(ValueError, match=r"--columns output=Best answer: no column 'Best answer' \(did you mean 'Best Answer'\?\)"):
        sources.detect_layout(source, "alpaca", {"instruction": "Question", "output": "Best answer"})
    assert sources.check_columns({"instrution": "Q"}) == [
        "columns: 'instrution' (did you mean instruction?) is not a field a layout reads; those are instruction, input, "
        "output, system, messages, conversations, text, source (--columns FIELD=YOUR_COLUMN)"]


def test_a_mapped_column_missing_in_a_record_is_named():
    with pytest.raises(RecordError) as info:
        parse_record({"Question": "q"}, "alpaca", MAPPING)
    assert (info.value.reason, info.value.detail) == ("missing_field", "missing column 'Best Answer' (--columns output=Best Answer)")


def test_json_and_jsonl_keep_their_positions(tmp_path):
    jsonl = tmp_path / "a.data"
    jsonl.write_text('{"text": "a"}\n\n{"text": "b"}\n')
    array = tmp_path / "b.jsonl"  # a JSON array, whatever the name says
    array.write_text(json.dumps([{"text": "a"}, {"text": "b"}]))
    assert [(f.container, [line for line, _ in records(f.path, f.container)]) for f in
            sources.expand(str(jsonl)) + sources.expand(str(array))] == [("jsonl", [1, 3]), ("json", [1, 2])]


def test_a_folder_of_train_and_test_files_is_refused_and_metadata_is_not_an_input(tmp_path):
    for name in ("train.jsonl", "test.jsonl", "dataset_infos.json"):
        (tmp_path / name).write_text('{"text": "a"}\n')
    with pytest.raises(ValueError, match=r"holds several splits \(test: 1 file\(s\), .*; train: 1 file\(s\)"):
        sources.expand(str(tmp_path))
    (tmp_path / "test.jsonl").unlink()
    assert sources.expand(str(tmp_path)) == [InputFile(str(tmp_path / "train.jsonl"), "jsonl")]
