"""One source of truth: dataclass <-> flags round trip, per-task resolution, run names, validation."""
import dataclasses
import json

import pytest

from transformer.config import (MAX_NAME, ConfigError, DataConfig, LossConfig, QuantConfig, RunConfig, TrainConfig,
                                build_parser, parse_config, resolve, run_name, to_argv)


def test_defaults_round_trip_through_flags():
    cfg = RunConfig()
    assert parse_config(to_argv(cfg)) == cfg
    assert parse_config([]) == cfg


def test_non_default_round_trip_through_flags_and_json(tmp_path):
    cfg = RunConfig(data=DataConfig(task="rte", augment=True, max_seq_len=96),
                    quant=QuantConfig(weight_bits=4, act_granularity="token", ffn2=False),
                    loss=LossConfig(attn_score_mse_weight=0.0, attn_prob_kl_weight=0.3),
                    train=TrainConfig(seed=52, max_steps=7))
    assert parse_config(to_argv(cfg)) == cfg
    (tmp_path / "run.json").write_text(json.dumps(cfg.to_dict()))
    assert parse_config(["--config", str(tmp_path / "run.json")]) == cfg
    # flags win over --config
    assert parse_config(["--config", str(tmp_path / "run.json"), "--train.seed", "62"]).train.seed == 62


def test_flags_are_generated_positive_and_scoped():
    help_text = build_parser().format_help()
    assert "--data.augment" in help_text and "--no-data.augment" in help_text
    assert "--loss.attn_prob_kl_weight" in help_text and "(default: 0.0)" in help_text
    assert parse_config(["--no-quant.embeddings"]).quant.embeddings is False
    assert parse_config(["--data.augment"]).data.augment is True
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--quant.act_granularity", "channel"])


def test_resolve_fills_per_task_defaults():
    cola = resolve(RunConfig(data=DataConfig(task="CoLA")))
    assert (cola.data.task, cola.train.batch_size, cola.data.max_seq_len, cola.train.eval_every) == ("cola", 16, 64, 50)
    stsb = resolve(RunConfig())
    assert (stsb.train.batch_size, stsb.data.max_seq_len, stsb.train.eval_every) == (32, 128, 100)
    assert stsb.model.teacher_dir == "models/sts-b"
    assert resolve(RunConfig(train=TrainConfig(batch_size=8))).train.batch_size == 8


def test_run_names_carry_every_non_default_knob_and_the_seed():
    base = RunConfig(loss=LossConfig(attn_score_mse_weight=0.0, attn_prob_kl_weight=1.0))
    assert run_name(base) == "sts-b-attn_score_mse=0-attn_prob_kl=1-s42"
    names = set()
    for seed in (42, 52):
        for g in (0.1, 0.2):
            names.add(run_name(dataclasses.replace(base, loss=dataclasses.replace(base.loss, attn_output_mse_weight=g),
                                                   train=TrainConfig(seed=seed))))
    assert len(names) == 4
    # a value equal to the task default is not a knob; paths are not knobs
    same = RunConfig(train=TrainConfig(batch_size=32), data=DataConfig(glue_dir="/elsewhere"))
    assert run_name(same) == run_name(RunConfig()) == "sts-b-s42"
    assert "no-" not in run_name(RunConfig(quant=QuantConfig(ffn1=False)))
    assert "ffn1=off" in run_name(RunConfig(quant=QuantConfig(ffn1=False)))


@pytest.mark.parametrize("argv,match", [
    (["--quant.weight_bits", "3"], "weight_bits"),
    (["--loss.hidden_mse_weight", "-1"], "must be >= 0"),
    (["--optim.lr", "0"], "lr"),
    (["--train.max_steps", "0"], "max_steps"),
])
def test_out_of_range_values_are_config_errors(argv, match):
    with pytest.raises(ConfigError, match=match):
        parse_config(argv)


def test_unknown_keys_in_a_config_file_are_errors(tmp_path):
    (tmp_path / "c.json").write_text(json.dumps({"loss": {"map_coeff": 1}}))
    with pytest.raises(ConfigError, match="map_coeff"):
        parse_config(["--config", str(tmp_path / "c.json")])


def test_long_names_stay_unique_and_short():
    long_a = RunConfig(model=dataclasses.replace(RunConfig().model, teacher_dir="/very/long/path/" + "x" * 300 + "/rte"),
                       loss=LossConfig(context_mse_weight=0.1, sa_output_mse_weight=0.2, value_relation_kl_weight=0.3),
                       quant=QuantConfig(ffn1=False, ffn2=False, pooler=False, qkv=False, attn_acts=False))
    long_b = dataclasses.replace(long_a, loss=dataclasses.replace(long_a.loss, context_mse_weight=0.2))
    a, b = run_name(long_a), run_name(long_b)
    assert len(a) <= MAX_NAME + len("-s42") < 255 and a != b and a.endswith("-s42")


@pytest.mark.parametrize("argv,match", [
    (["--quant.weight_bits", "4", "--quant.threshold_ratio", "0.5"], "threshold_ratio is the ternary"),
    (["--quant.weight_bits", "8", "--quant.threshold_ratio", "0.9"], "does nothing with --quant.weight_bits 8"),
    (["--ti.step1_run", "output/sts-b/x"], "needs --ti.step 2"),
    (["--no-quant.embeddings", "--quant.embedding_bits", "8"], "embedding_bits does nothing"),
    (["--quant.embedding_bits", "3"], "embedding_bits must be 2, 4 or 8"),
])
def test_options_that_would_do_nothing_are_refused(argv, match):
    with pytest.raises(ConfigError, match=match):
        parse_config(argv)


def test_temperature_is_refused_for_regression_and_kept_for_classification():
    with pytest.raises(ConfigError, match="sts-b is a regression task"):
        resolve(parse_config(["--data.task", "sts-b", "--loss.temperature", "2"]))
    assert resolve(parse_config(["--data.task", "rte", "--loss.temperature", "2"])).loss.temperature == 2.0
    assert parse_config(["--quant.weight_bits", "4"]).quant.threshold_ratio == 0.7  # the default is no choice
    # ternary word embeddings under 4-bit linears: the threshold still acts on them
    assert parse_config(["--quant.weight_bits", "4", "--quant.embedding_bits", "2",
                         "--quant.threshold_ratio", "0.5"]).quant.threshold_ratio == 0.5


def test_published_eval_protocol_under_fixed_batching():
    # the published code evaluates in batches of the training batch size (32; CoLA 16)
    assert resolve(parse_config(["--data.task", "sts-b"])).train.eval_batch_size == 128
    assert resolve(parse_config(["--data.task", "sts-b", "--data.batching", "fixed"])).train.eval_batch_size == 32
    assert resolve(parse_config(["--data.task", "cola", "--data.batching", "fixed"])).train.eval_batch_size == 16
    assert resolve(parse_config(["--data.task", "rte", "--data.batching", "fixed", "--train.batch_size", "8"])
                   ).train.eval_batch_size == 8
    # in the run name only when it is not the default of the run's batching
    assert "eval_batch_size" not in run_name(parse_config(["--data.task", "cola", "--data.batching", "fixed"]))
    assert "eval_batch_size=64" in run_name(parse_config(["--train.eval_batch_size", "64"]))
    assert "eval_batch_size=128" in run_name(parse_config(["--data.batching", "fixed", "--train.eval_batch_size", "128"]))
