"""Unknown scorers, unreadable models, unwritable outputs and bad options fail before Ray starts."""


import pytest

from annotate.config import AnnotateConfig, load_config
from annotate.pipeline import prepare
from tests.conftest import LIMA


def _config(tmp_path, model, **kw):
    base = dict(input=[str(LIMA)], output=str(tmp_path / "out"), model=str(model), scorers=["tfidf"])
    base.update(kw)
    return AnnotateConfig(**base)


def test_unknown_scorer(tmp_path, smol_tokenizer_dir):
    with pytest.raises(ValueError, match="unknown scorer 'tfidff'.*available: .*tfidf"):
        prepare(_config(tmp_path, smol_tokenizer_dir, scorers=["tfidff"]))


def test_unreadable_model_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        prepare(_config(tmp_path, tmp_path / "missing_model"))


def test_unwritable_output(tmp_path, smol_tokenizer_dir):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(OSError, match="not writable"):
        prepare(_config(tmp_path, smol_tokenizer_dir, output=str(blocker / "out")))


def test_bad_options_are_named(tmp_path, smol_tokenizer_dir):
    with pytest.raises(ValueError) as info:
        prepare(_config(tmp_path, smol_tokenizer_dir, format="csv", overlength="cut", input=[str(tmp_path / "none.jsonl")]))
    message = str(info.value)
    assert "format: 'csv'" in message and "overlength: 'cut'" in message and "none.jsonl does not exist" in message
    with pytest.raises(ValueError, match="unknown option.*'term'"):
        prepare(_config(tmp_path, smol_tokenizer_dir, scorer_options={"tfidf": {"trm": "word"}}))
    with pytest.raises(ValueError, match=r"scorers: names no scorer; --list-scorers shows them"):
        prepare(_config(tmp_path, smol_tokenizer_dir, scorers=[]))


def test_yaml_config_with_cli_override(tmp_path):
    path = tmp_path / "a.yaml"
    path.write_text(f"input: {LIMA}\noutput: {tmp_path}/o\nscorers: tfidf,ref_loss\nmax_length: 512\nscorer_options:\n  ref_loss: {{dtype: float32}}\n")
    config, _ = load_config(["--config", str(path), "--max-length", "256", "--scorer-option", "ref_loss.max_batch_tokens=100"])
    assert config.scorers == ["tfidf", "ref_loss"] and config.max_length == 256 and config.input == [str(LIMA)]
    assert config.scorer_options == {"ref_loss": {"dtype": "float32", "max_batch_tokens": 100}}
    path.write_text("inputs: x\n")
    with pytest.raises(ValueError, match=r"a.yaml: unknown key 'inputs' \(did you mean input\?\)"):
        load_config(["--config", str(path)])


def test_command_line_forms_are_trains():
    """One mechanism (data/config.py): flags, key=value, several files per list flag, bare bools."""
    config, list_scorers = load_config(["--input", "a.jsonl", "b.jsonl", "--strict", "max_length=300", "--scorers=tfidf,entropy",
                                        "--scorer-option", "tfidf.term=word", "--trust-remote-code", "false", "--list-scorers"])
    assert config.input == ["a.jsonl", "b.jsonl"] and config.strict is True and config.max_length == 300
    assert config.scorers == ["tfidf", "entropy"] and config.scorer_options == {"tfidf": {"term": "word"}}
    assert config.trust_remote_code is False and list_scorers
    with pytest.raises(ValueError) as info:
        load_config(["--max-lenght", "3", "--shard-size", "many", "--scorer-option", "term=word"])
    message = str(info.value)
    assert "unknown key 'max_lenght' (did you mean max_length?)" in message
    assert "shard_size: expected an integer, got 'many'" in message
    assert "--scorer-option 'term=word': expected NAME.KEY=VALUE" in message


# -- scorer models: ref_loss named explicitly, every scorer model on the job's tokenizer ------------------------


def _retokenized_copy(src, out, edit):
    """A copy of the model folder ``src`` whose tokenizer.json ``edit`` changed (a model whose tokenizer differs)."""
    import json
    import shutil

    shutil.copytree(src, out)
    raw = json.loads((out / "tokenizer.json").read_text(encoding="utf-8"))
    edit(raw["model"])
    (out / "tokenizer.json").write_text(json.dumps(raw, ensure_ascii=False), encoding="utf-8")
    return out


def test_ref_loss_needs_its_model_named(tmp_path, tiny_llama_dir, capsys):
    import ray

    from annotate.run import main

    with pytest.raises(ValueError, match=r"ref_loss: --scorer-option ref_loss\.model=PATH is required.*not defaulted to --model"):
        prepare(_config(tmp_path, tiny_llama_dir, scorers=["tfidf", "ref_loss"]))
    was_running = ray.is_initialized()
    assert main(["--input", str(LIMA), "--model", str(tiny_llama_dir), "--scorers", "ref_loss",
                 "--output", str(tmp_path / "o")]) == 2
    assert "ref_loss.model=PATH is required" in capsys.readouterr().err
    assert ray.is_initialized() == was_running  # refused before Ray starts
    assert not (tmp_path / "o").exists()
    # base_loss and entropy still default to --model: that is the base model
    job = prepare(_config(tmp_path, tiny_llama_dir, scorers=["base_loss", "entropy"]))
    assert [s.model for s in job.scorer_infos] == [str(tiny_llama_dir)] * 2


def test_scorer_model_with_another_tokenizer_is_refused_naming_both(tmp_path, tiny_llama_dir, tiny_llama_ref_dir):
    # Same tokenizer files, other weights: accepted.
    job = prepare(_config(tmp_path, tiny_llama_dir, scorers=["ref_loss"], scorer_options={"ref_loss": {"model": str(tiny_llama_ref_dir)}}))
    assert job.scorer_infos[0].model == str(tiny_llama_ref_dir)

    def swap(model):  # two vocabulary entries trade ids: every merge still names the same strings
        vocab = model["vocab"]
        vocab["the"], vocab["and"] = vocab["and"], vocab["the"]

    swapped = _retokenized_copy(tiny_llama_ref_dir, tmp_path / "ref_swapped", swap)
    with pytest.raises(ValueError) as info:
        prepare(_config(tmp_path, tiny_llama_dir, scorers=["tfidf", "ref_loss"], scorer_options={"ref_loss": {"model": str(swapped)}}))
    message = str(info.value)
    assert f"--scorer-option ref_loss.model={swapped}" in message and f"--model {tiny_llama_dir}" in message
    assert "2 of its 49152 vocabulary entries differ" in message

    def unmerge(model):  # the same vocabulary, one merge fewer: " the" is no longer one token
        merges = model["merges"]
        target = next(m for m in merges if (m if isinstance(m, str) else " ".join(m)) == "Ġt he")
        merges.remove(target)

    unmerged = _retokenized_copy(tiny_llama_dir, tmp_path / "base_unmerged", unmerge)
    with pytest.raises(ValueError, match=rf"--scorer-option base_loss.model={unmerged}: its tokenizer gives other token "
                                         rf"ids than --model {tiny_llama_dir}'s \(the text .* tokenizes to other ids"):
        prepare(_config(tmp_path, tiny_llama_dir, scorers=["base_loss"], scorer_options={"base_loss": {"model": str(unmerged)}}))


def test_scorer_model_with_fewer_embeddings_is_refused(tmp_path, tiny_llama_dir, smol_tokenizer_dir):
    from tests.conftest import make_tiny_llama

    small = make_tiny_llama(tmp_path / "small_vocab", smol_tokenizer_dir, vocab=1024)
    with pytest.raises(ValueError, match=rf"ref_loss.model={small}: its embeddings have 1024 rows, but --model .* gives ids up to 49151"):
        prepare(_config(tmp_path, tiny_llama_dir, scorers=["ref_loss"], scorer_options={"ref_loss": {"model": str(small)}}))


# -- actors the cluster can host: refused at start rather than waited for ---------------------------------------


def test_plan_actors_sizes_and_shares():
    from annotate.pipeline import plan_actors

    # 2 CPUs, no GPU: one actor per model scorer, the CPUs split among the groups for tfidf; half a CPU each.
    cpu = plan_actors(["tfidf", "base_loss"], ["base_loss"], gpus=0, cpu_total=2.0)
    assert cpu.pool_sizes == {"tfidf": 1, "base_loss": 1} and cpu.gpus_per_actor == {"tfidf": 0.0, "base_loss": 0.0}
    assert cpu.score_cpus == 0.5
    # 2 GPUs shared by two model scorers; llmlingua2 (host-bound) with 4 actors per GPU: 8 actors of 1/8 GPU.
    gpu = plan_actors(["tfidf", "base_loss", "llmlingua2"], ["base_loss", "llmlingua2"], gpus=2, cpu_total=16.0,
                      actors_per_gpu={"llmlingua2": 4})
    assert gpu.pool_sizes == {"tfidf": 5, "base_loss": 2, "llmlingua2": 8}
    assert gpu.gpus_per_actor == {"tfidf": 0.0, "base_loss": 0.5, "llmlingua2": 0.125}
    assert sum(gpu.pool_sizes[n] * gpu.gpus_per_actor[n] for n in gpu.pool_sizes) == 2.0  # every GPU share, no more
    # --scorer-actors within the shares: 2 llmlingua2 actors on one GPU with actors_per_gpu 2.
    two = plan_actors(["llmlingua2"], ["llmlingua2"], gpus=1, cpu_total=4.0, scorer_actors=2, actors_per_gpu={"llmlingua2": 2})
    assert two.pool_sizes == {"llmlingua2": 2} and two.gpus_per_actor == {"llmlingua2": 0.5}


def test_plan_actors_refuses_what_the_cluster_cannot_host():
    from annotate.pipeline import ClusterTooSmall, plan_actors

    with pytest.raises(ClusterTooSmall) as info:
        plan_actors(["base_loss"], ["base_loss"], gpus=2, cpu_total=8.0, scorer_actors=3)
    assert str(info.value) == ("--scorer-actors 3: 3 base_loss actors of 1 GPU each need 3 GPUs, the cluster has 2: at most "
                               "2 fit, and Ray would wait for ever for the rest. Use --scorer-actors 2 or less, or 0 (auto)")
    with pytest.raises(ClusterTooSmall, match=r"--scorer-actors 2: 2 llmlingua2 actors of 0.5 GPU each need 1 GPUs, the "
                                              r"cluster has 1, each GPU split between llmlingua2, base_loss: at most 1 fit.*"
                                              r"--scorer-option llmlingua2.actors_per_gpu=N lets N share a GPU"):
        plan_actors(["llmlingua2", "base_loss"], ["base_loss", "llmlingua2"], gpus=1, cpu_total=8.0, scorer_actors=2,
                    actors_per_gpu={"llmlingua2": 1})
    with pytest.raises(ClusterTooSmall, match=r"--tokenize-actors 4: each takes 0.5 CPU and the score actors leave 1 of the "
                                              r"cluster's 2 CPUs: at most 2 fit"):
        plan_actors(["tfidf", "base_loss"], ["base_loss"], gpus=0, cpu_total=2.0, tokenize_actors=4)
    assert plan_actors(["tfidf", "base_loss"], ["base_loss"], gpus=0, cpu_total=2.0, tokenize_actors=2).pool_sizes



def test_plan_actors_cpu_threads_devices_and_tokenize_actors():
    """The rest of the sizing, by hand: torch-thread shares of model actors on CPU, devices, tokenize actors."""
    from annotate.pipeline import plan_actors

    # 4 CPUs, no GPU, two model scorers on CPU: one actor each, sharing the 4 CPUs (2 each); tfidf gets 4 // 3 = 1
    # actor. 3 score actors of 0.5 CPU leave 2.5: 5 tokenize actors would fit, but at most one per CPU (4).
    cpu = plan_actors(["tfidf", "base_loss", "llmlingua2"], ["base_loss", "llmlingua2"], gpus=0, cpu_total=4.0)
    assert cpu.pool_sizes == {"tfidf": 1, "base_loss": 1, "llmlingua2": 1} and cpu.score_cpus == 0.5
    assert cpu.cpu_shares == {"tfidf": 0.0, "base_loss": 2.0, "llmlingua2": 2.0}
    assert [cpu.device(n) for n in cpu.pool_sizes] == ["cpu", "cpu", "cpu"] and cpu.tokenize_cpus_free == 2.5
    assert [cpu.tokenize_actors_for(n) for n in (1, 3, 10)] == [1, 3, 4]
    # The tests' job on 2 CPUs: one base_loss actor with both CPUs as threads; 1 CPU left, 2 tokenize actors.
    two = plan_actors(["tfidf", "base_loss"], ["base_loss"], gpus=0, cpu_total=2.0)
    assert two.cpu_shares == {"tfidf": 0.0, "base_loss": 2.0} and [two.tokenize_actors_for(n) for n in (1, 8)] == [1, 2]
    assert plan_actors(["tfidf", "base_loss"], ["base_loss"], gpus=0, cpu_total=2.0, tokenize_actors=1).tokenize_actors_for(8) == 1
    # On GPUs a model scorer's actors use no CPU threads of their own; 15 score actors of 0.5 CPU leave 8.5 of 16:
    # 17 tokenize actors would fit, one per CPU caps them at 16.
    gpu = plan_actors(["tfidf", "base_loss", "llmlingua2"], ["base_loss", "llmlingua2"], gpus=2, cpu_total=16.0,
                      actors_per_gpu={"llmlingua2": 4})
    assert gpu.cpu_shares == {"tfidf": 0.0, "base_loss": 0.0, "llmlingua2": 0.0}
    assert [gpu.device(n) for n in gpu.pool_sizes] == ["cpu", "cuda", "cuda"] and gpu.tokenize_actors_for(100) == 16
    # 8 tfidf actors on 2 CPUs: each gets (2 - 0.5) / 8 CPU, which leaves exactly one tokenize actor's half CPU.
    many = plan_actors(["tfidf"], [], gpus=0, cpu_total=2.0, scorer_actors=8)
    assert many.score_cpus == 0.1875 and many.tokenize_cpus_free == 0.5 and many.tokenize_actors_for(8) == 1


@pytest.mark.parametrize("args, said", [
    (["--scorers", "base_loss", "--scorer-actors", "2"],
     "error: --scorer-actors 2: 2 base_loss actors of 1 GPU each need 2 GPUs, the cluster has 1: at most 1 fit"),
    (["--scorers", "tfidf", "--tokenize-actors", "9"], "error: --tokenize-actors 9: each takes 0.5 CPU"),
], ids=["gpu-actors", "tokenize-actors"])
def test_more_actors_than_a_local_ray_hosts_are_refused_at_start(tmp_path, lima_slice, tiny_llama_dir, capsys, args, said):
    """A local Ray of 2 CPUs and 1 (declared) GPU: without the check the extra actors would wait for ever."""
    import ray

    from annotate.run import main

    ray.shutdown()
    ray.init(num_cpus=2, num_gpus=1, include_dashboard=False)
    try:
        out = tmp_path / "out"
        assert main(["--input", str(lima_slice), "--model", str(tiny_llama_dir), "--output", str(out), *args]) == 2
        assert said in capsys.readouterr().err
        assert not list(out.glob("shard-*.parquet"))
    finally:
        ray.shutdown()


def test_the_tokenizer_check_reads_the_jobs_own_rows(tmp_path, smol_tokenizer, tiny_llama_dir):
    """New job: the first input records through the chat template; --add-scorers: the first shard's rows decoded."""
    import pyarrow.parquet as pq

    from annotate.pipeline import PROBE_ROWS, _probe_texts
    from data.formats import parse_record
    from schemas.shard import tokenizer_fingerprint
    from tests.train.conftest import make_examples, write_annotated_dir

    config = _config(tmp_path, tiny_llama_dir, format="lima")
    records = [parse_record(line, "lima")[0] for line in LIMA.read_text(encoding="utf-8").splitlines()[:PROBE_ROWS]]
    assert _probe_texts(config, tmp_path / "out", smol_tokenizer, adding=False) == [
        smol_tokenizer.apply_chat_template(m, tokenize=False) for m in records]
    examples = make_examples(6, ["tfidf"], seed=4)
    out = tmp_path / "annotated"
    write_annotated_dir(out, examples, ["tfidf"], tokenizer_fp=tokenizer_fingerprint(smol_tokenizer), rows_per_shard=6)
    (out / "shard-00000.parquet").rename(out / "shard-00001.parquet")
    write_annotated_dir(out, [], ["tfidf"], tokenizer_fp=tokenizer_fingerprint(smol_tokenizer))  # shard 0: no rows
    assert pq.ParquetFile(out / "shard-00000.parquet").metadata.num_rows == 0
    assert _probe_texts(config, out, smol_tokenizer, adding=True) == [
        smol_tokenizer.decode(e["input_ids"].tolist()) for e in examples[:PROBE_ROWS]]
