"""Runnable examples of the public client API (trainer_client.Run and Predictor) from
training loops other than transformers.Trainer; tests/trainer/test_examples.py runs them."""
