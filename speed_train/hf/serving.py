"""``transformers serve`` with the SPEED classes resolvable: what :mod:`speed_train.tools.serve` runs.

transformers' own server (``transformers/cli/serve.py``, ``cli/serving/``) loads a model in a
process of its own (``EngineClient.start_process``, spawned) with
``ModelLoader._load_model``, which resolves the architecture with
``getattr(transformers, config.architectures[0])``: a ``speed_<arch>`` export names
``SpeedLlamaForCausalLM`` ..., which transformers does not have, so stock ``transformers serve``
fails at start-up even with ``--trust-remote-code``. Two hooks, nothing else of the server:

- :class:`SpeedModelLoader` (transformers' ``ModelLoader``): before loading, in the model's
  process, it registers the package's ``speed_<arch>`` classes with the Auto classes (config and
  tokenizer load without ``trust_remote_code``, no code runs from the folder, as
  :func:`speed_train.loading.load_model` does) and puts the model classes on the ``transformers``
  namespace, where ``_load_model`` looks. The spawned process unpickles the loader, so it imports
  this module, and the hook runs there.
- :class:`SpeedServe` (transformers' ``Serve``): its loader is a :class:`SpeedModelLoader`.

Every request then runs ``model.generate()`` of the export's class (transformers'
``GenerateRunner``): the shallow prefill from the token ids, the deep decode, SPEED's two-depth
cache. docs/DESIGN.md ("Serving it") gives the upstream change that makes these hooks unnecessary.
"""

from __future__ import annotations

from transformers.cli.serve import Serve
from transformers.cli.serving import model_manager
from transformers.cli.serving.model_manager import ModelLoader

from speed_train.hf import SPEED_CLASSES, register


def expose_speed_classes() -> None:
    """The SPEED classes where transformers' server resolves them (idempotent)."""
    register()
    # the module object _load_model reads: importing some model modules rebinds
    # sys.modules["transformers"], so `import transformers` here may be another object
    for _, model_cls in SPEED_CLASSES.values():
        setattr(model_manager.transformers, model_cls.__name__, model_cls)


class SpeedModelLoader(ModelLoader):
    """transformers' loader, resolving the ``speed_<arch>`` classes (see the module doc)."""

    def load_model_and_processor(self, model_id, on_progress=None):
        expose_speed_classes()  # in the model's process, which imported this module to unpickle us
        return super().load_model_and_processor(model_id, on_progress)


class SpeedServe(Serve):
    """``transformers serve`` whose models load with :class:`SpeedModelLoader`."""

    # Serve.__init__ builds its ModelLoader, then serves (run or run_api_servers, which both read
    # self.loader): the one place to swap it in, with the settings it was built with
    @property
    def loader(self) -> SpeedModelLoader:
        return self._speed_loader

    @loader.setter
    def loader(self, loader: ModelLoader) -> None:
        loader.__class__ = SpeedModelLoader
        self._speed_loader = loader
