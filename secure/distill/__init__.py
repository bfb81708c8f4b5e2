"""Power-Softmax distillation of BERT-style models: student attention, training, calibration, CLI, corpora
(docstrings, WordNet, their mixture), distilled models cached by name."""
