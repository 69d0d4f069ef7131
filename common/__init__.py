"""What the data engine, the model and the trainer share, so that none of them imports another:
opening and decoding videos (`video`), finding model weights (`weights`), atomic writes
(`files`), settings files and overrides (`settings`), errors as one line (`errors`), and the
synthetic brick-film videos of the demo and the tests (`synthetic`)."""
