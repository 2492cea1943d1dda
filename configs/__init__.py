"""Recipes: ready training configs, installed as `mlxft.recipes` (`mlxft lora --config NAME`)."""
