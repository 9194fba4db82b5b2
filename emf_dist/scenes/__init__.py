"""The scene world: procedural scenes with their captions (generator.py) and the detector that
scores an image against a scene's description (detector.py). Data prep draws its built-in data
from it, evaluation its benchmark prompts and ground truth."""
