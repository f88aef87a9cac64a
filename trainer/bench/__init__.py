"""Benchmarks that train: a real model fed by augserve vs a DataLoader (``augserve bench trainer``), and the
trainer process of ``augserve bench e2e``. They sit above both the service and the trainer."""
