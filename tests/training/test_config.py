"""Config files, command-line overrides and the seed's config keys."""

import argparse

import pytest

from training.config import CONFIG_DIR, ConfigError, add_config_arguments, load_config, overrides_from_args

# Every key of the seed's config table and the field that does its job here (ModelArts keys aside).
SEED_KEYS = {
    "train_path": "output_dir",
    "data_path": "data_path",
    "checkpoint_path": "checkpoint",
    "eval_data_path": "eval_data_path",
    "eval_interval": "eval_interval",
    "device_target": "device_target",
    "begin_epoch": "begin_epoch",
    "end_epoch": "end_epoch",
    "total_epoch": "epochs",
    "dataset": "dataset",
    "num_classes": "num_classes",
    "batchsize": "batch_size",
    "input_size": "input_size",
    "lr_scheme": "lr_scheme",
    "lr": "lr",
    "lr_init": "lr_init",
    "lr_end": "lr_end",
    "warmup_epochs": "warmup_epochs",
    "use_label_smooth": "label_smoothing",
    "label_smooth_factor": "label_smoothing",
    "conv_init": "conv_init",
    "dense_init": "dense_init",
    "optimizer": "optimizer",
    "loss_scale": "loss_scale",
    "opt_momentum": "momentum",
    "wd": "weight_decay",
    "eps": "eps",
    "save_ckpt": "save_checkpoint",
    "save_checkpoint_epochs": "save_checkpoint_epochs",
    "keep_checkpoint_max": "keep_checkpoint_max",
    "model": "arch",
}


def test_seed_recipe_values():
    cfg = load_config("hrnet_w48_imagenet")
    assert (cfg.arch, cfg.batch_size, cfg.epochs, cfg.optimizer) == ("w48", 16, 120, "rmsprop")
    assert (cfg.rmsprop_decay, cfg.momentum, cfg.eps, cfg.weight_decay) == (0.9, 0.9, 0.001, 1e-5)
    assert (cfg.loss_scale, cfg.lr_scheme, cfg.lr_init, cfg.lr, cfg.lr_end) == (
        1024,
        "linear",
        1e-4,
        0.01,
        1e-5,
    )
    assert (cfg.warmup_epochs, cfg.label_smoothing, cfg.eval_interval) == (2, 0.1, 10)
    assert (cfg.save_checkpoint_epochs, cfg.keep_checkpoint_max, cfg.mode) == (1, 10, "graph")
    assert cfg.lr_scale_batch == 128  # 8 x 16: on other device counts the LRs follow the global batch
    pytorch = load_config("hrnet_w48_pytorch")
    assert (pytorch.optimizer, pytorch.nesterov, pytorch.lr, pytorch.weight_decay) == (
        "sgd",
        True,
        0.05,
        1e-4,
    )
    assert (pytorch.epochs, pytorch.lr_scheme, pytorch.lr_milestones) == (100, "step", (30, 60, 90))
    gpu = load_config("hrnet_w48_imagenet_gpu")
    assert (gpu.batch_size, gpu.lr, gpu.lr_init, gpu.lr_end) == (64, 0.04, 4e-4, 4e-5)


def test_every_bundled_config_loads():
    names = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
    assert {"hrnet_w48_imagenet", "hrnet_w48_imagenet_gpu", "hrnet_w48_pytorch", "hrnet_digits"} <= set(names)
    for name in names:
        load_config(name)


def test_every_seed_key_has_a_field():
    cfg = load_config()
    for field_name in SEED_KEYS.values():
        assert hasattr(cfg, field_name)


def test_flags_override_the_file():
    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    args = parser.parse_args(["--lr", "0.5", "--crop-scale", "0.5,1", "--nesterov", "--epochs", "7"])
    cfg = load_config("hrnet_w48_imagenet", overrides_from_args(args))
    assert (cfg.lr, cfg.crop_scale, cfg.nesterov, cfg.epochs) == (0.5, (0.5, 1.0), True, 7)
    assert cfg.batch_size == 16  # untouched keys keep the file's value


def test_bad_keys_and_values_are_reported(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("learning_rate: 0.1\n")
    with pytest.raises(ConfigError, match="learning_rate"):
        load_config(bad)
    with pytest.raises(ConfigError, match="optimizer"):
        load_config(None, {"optimizer": "lamb"})
    with pytest.raises(ConfigError, match="batch_size"):
        load_config(None, {"batch_size": "many"})
    with pytest.raises(ConfigError, match="not found"):
        load_config("no_such_config")


def test_yes_no_flags_take_no_value_and_the_environment_sits_between_file_and_flags():
    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    text = parser.format_help()
    assert "--no-progress" in text and "rmsprop (the seed), sgd or adam" in text
    assert "(default: none)" in text  # empty defaults are named, not left blank
    args = parser.parse_args(["--no-progress", "--epochs", "7"])
    env = {"HRNET_TRAIN_EPOCHS": "5", "HRNET_TRAIN_BATCH_SIZE": "8", "HRNET_PORT": "1"}
    cfg = load_config("hrnet_digits", overrides_from_args(args), env=env)
    assert (cfg.progress, cfg.epochs, cfg.batch_size) == (False, 7, 8)
