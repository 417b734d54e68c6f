"""Evaluation: retrieval recall, caption metrics, VQA accuracy, NLVR2 accuracy, reports and plots."""
