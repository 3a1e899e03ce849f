"""Data layer: recipes (YAML mixtures of chat sources) -> conversations -> SPEED-encoded examples.

recipe = load_recipe("packaged_chat")
train, held_out, report = build_dataset(recipe, tokenizer, SpeedConfig(anchor="bos"), 2048, cache_dir)
"""

from .errors import DataError, HubUnavailableError, RecipeError
from .formats import BAD_ROW_REASONS, FORMATS, BadRow, to_conversation
from .pipeline import EncodedDataset, build_dataset, cache_key, default_num_proc, encode_dataset
from .recipes import Recipe, SourceSpec, available_recipes, load_conversations, load_recipe
from .report import DataReport, SourceReport, TokenizeStats

__all__ = [
    "BAD_ROW_REASONS",
    "FORMATS",
    "BadRow",
    "DataError",
    "DataReport",
    "EncodedDataset",
    "HubUnavailableError",
    "Recipe",
    "RecipeError",
    "SourceReport",
    "SourceSpec",
    "TokenizeStats",
    "available_recipes",
    "build_dataset",
    "cache_key",
    "default_num_proc",
    "encode_dataset",
    "load_conversations",
    "load_recipe",
    "to_conversation",
]
