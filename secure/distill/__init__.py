"""Power-Softmax distillation of BERT-style models: student attention, training, calibration, CLI, corpus."""
