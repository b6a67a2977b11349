"""The guide's own pipeline, as its cells write it (Steps 1-3, the CNN, train and test functions).

Run by ``benchmarks/train_speed.py`` as a separate process so that both sides pay their own start-up.
Prints one JSON line: final test accuracy (percent), each epoch's accuracy and the seconds from interpreter
start to the end of that epoch's test (``epoch_end_seconds``). Only ``--data-dir``, ``--epochs`` and
``--seed`` vary.
"""

import argparse
import json
import time

T0 = time.perf_counter()

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.optim as optim  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402
from torchvision import datasets, transforms  # noqa: E402


class CNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, kernel_size=3, padding=1)
        self.relu = nn.ReLU()
        self.pool = nn.MaxPool2d(2, 2)
        self.conv2 = nn.Conv2d(16, 32, kernel_size=3, padding=1)
        self.fc1 = nn.Linear(1568, 128)
        self.fc2 = nn.Linear(128, 10)

    def forward(self, x):
        x = self.pool(self.relu(self.conv1(x)))
        x = self.pool(self.relu(self.conv2(x)))
        x = x.view(-1, 32 * 7 * 7)
        x = self.relu(self.fc1(x))
        return self.fc2(x)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--data-dir", default="data")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    device = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    BATCH_SIZE, LEARNING_RATE = 64, 0.001
    transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.1307,), (0.3081,))])
    train_dataset = datasets.MNIST(root=args.data_dir, train=True, download=False, transform=transform)
    test_dataset = datasets.MNIST(root=args.data_dir, train=False, download=False, transform=transform)
    train_loader = DataLoader(train_dataset, batch_size=BATCH_SIZE, shuffle=True)
    test_loader = DataLoader(test_dataset, batch_size=BATCH_SIZE, shuffle=False)
    model = CNN().to(device)
    criterion = nn.CrossEntropyLoss()
    optimizer = optim.Adam(model.parameters(), lr=LEARNING_RATE)

    def train():
        model.train()
        for data, target in train_loader:
            data, target = data.to(device), target.to(device)
            optimizer.zero_grad()
            loss = criterion(model(data), target)
            loss.backward()
            optimizer.step()

    def test():
        model.eval()
        correct = 0
        with torch.no_grad():
            for data, target in test_loader:
                data, target = data.to(device), target.to(device)
                correct += model(data).argmax(dim=1).eq(target).sum().item()
        return 100.0 * correct / len(test_loader.dataset)

    accuracies, ends = [], []
    for _ in range(args.epochs):
        train()
        accuracies.append(test())
        ends.append(round(time.perf_counter() - T0, 2))
    print(json.dumps({"accuracy": accuracies[-1], "accuracies": accuracies, "epoch_end_seconds": ends,
                      "seconds_in_process": time.perf_counter() - T0,
                      "device": device, "threads": torch.get_num_threads()}))


if __name__ == "__main__":
    main()
