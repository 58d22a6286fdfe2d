"""A generator serving another model is kept out of weight sync, from both sides: the learner leaves a
heartbeat whose layout digest (parameter names and shapes) differs from its own out of the group it forms,
and a generator that reads an announcement of another layout stops with an error naming both. The digest a
generator computes from its model directory equals the one the learner computes from the loaded model."""

from __future__ import annotations

import threading
import time
from pathlib import Path

from transformers import Qwen2Config, Qwen2ForCausalLM

from generator.engine import model_layout
from services.config_io import load_config
from services.control import ControlPlane, Heartbeat, Keys
from services.membership import WeightGroup, WeightListener
from services.protocol import WeightsAnnouncement
from services.weight_sync import layout_digest


def _tiny(path: Path, layers: int) -> Qwen2ForCausalLM:
    cfg = Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                      num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True)
    model = Qwen2ForCausalLM(cfg)
    model.save_pretrained(path)
    return model


def test_generator_and_learner_compute_the_same_layout(tmp_path: Path) -> None:
    model = _tiny(tmp_path / "m", 2)
    names, shapes = zip(*[(n, tuple(p.shape)) for n, p in model.state_dict().items()])
    assert layout_digest(*model_layout(tmp_path / "m")) == layout_digest(names, shapes)
    _tiny(tmp_path / "deeper", 3)
    assert layout_digest(*model_layout(tmp_path / "deeper")) != layout_digest(names, shapes)


def test_learner_leaves_out_a_generator_of_another_model(redis_client, caplog) -> None:
    cfg = load_config(environ={})
    keys = Keys("orz:layout")
    names, shapes = ("a.weight", "b.weight"), ((4, 4), (4,))
    control = ControlPlane(redis_client, keys)
    group = WeightGroup(cfg, control, names, shapes)
    now = time.time()
    beats = {"gen-same": layout_digest(names, shapes), "gen-other": layout_digest(names, ((8, 4), (4,))),
             "gen-unchecked": None}
    for gid, layout in beats.items():
        control.beat(gid, Heartbeat(now, 0, 1, "host", now, 0.0, layout))
    assert group.live() == ("gen-same", "gen-unchecked")
    assert group.refused == {"gen-other"}
    assert sum("serves a model of another layout" in r.message for r in caplog.records) == 1
    group.live()  # logged once per generator, not on every call
    assert sum("serves a model of another layout" in r.message for r in caplog.records) == 1


def test_generator_refuses_an_announcement_of_another_model(redis_client) -> None:
    cfg = load_config(environ={})
    keys = Keys("orz:layout")
    mine = layout_digest(("a.weight",), ((4, 4),))
    ann = WeightsAnnouncement("tcp://127.0.0.1:1", 2, "gloo", ("a.weight",), ((8, 4),), "float32", 1 << 20,
                              "s1", ("gen-0",))
    control = ControlPlane(redis_client, keys)
    control.announce(ann)
    stop = threading.Event()
    listener = WeightListener(cfg, control, "gen-0", stop, layout=mine)
    listener.start()
    listener.join(10)
    stop.set()
    assert not listener.is_alive() and listener.joined == 0
    assert isinstance(listener.error, RuntimeError)
    assert "another architecture" in str(listener.error) and mine[:12] in str(listener.error)
