"""The seven utterance labels, in the official scorer's order (its ``emotion_idx``: neutral 0 ... surprise 6).

Its own module so that pure code (prompts, config validation) can import the list without pulling in I/O."""

EMOTIONS = ("neutral", "anger", "disgust", "fear", "joy", "sadness", "surprise")
