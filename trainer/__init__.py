"""Reference CNNs trained from the augserve stream: model zoo, training loop, transfer learning, evaluation."""
