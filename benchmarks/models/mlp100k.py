"""A ~100k-parameter MLP on 8x8 digits, the model size the round-overhead goal is stated for."""

from torch import nn

INPUT_SHAPE = (1, 8, 8)
NUM_CLASSES = 10
DEFAULT_CUT = "act1"


class MLP100k(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(64, 384)
        self.act1 = nn.ReLU()
        self.fc2 = nn.Linear(384, 192)
        self.act2 = nn.ReLU()
        self.fc3 = nn.Linear(192, 10)

    def forward(self, x):
        return self.fc3(self.act2(self.fc2(self.act1(self.fc1(self.flatten(x))))))


def factory() -> nn.Module:
    return MLP100k()
