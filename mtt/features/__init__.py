"""Audio to what the model reads: the front ends (frontend: VGGish log-mel, mel-dB), the feature
store on disk (store, written by preprocess) and the training and evaluation streams over it
(streams: pescador's mux, epoch passes, the steps-per-epoch policies)."""
