"""2. Data path: the engine's device-resident batches (one gather per batch, augmentation on the
whole batch) against torch.utils.data.DataLoader over the same tensors (per-sample indexing and
collation; per-sample torchvision transforms when augmenting). Three epochs of batches of 64 over
a CIFAR-10-shaped training set (random uint8 pixels), without and with augmentation (random
crop after 4-pixel padding, horizontal flip). Targets: >= 10x and >= 2x.
"""

from __future__ import annotations

from harness import QUICK, Row, alternate, quiet, report, row_from, timed

N, BATCH, EPOCHS = (1_000, 64, 1) if QUICK else (10_000, 64, 3)


def main() -> list[Row]:
    quiet()
    import torch
    from torch.utils.data import DataLoader, Dataset, TensorDataset
    from torchvision.transforms import v2

    from reprolab.data import Split
    from reprolab.data.batches import batches_of

    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (N, 3, 32, 32), dtype=torch.uint8, generator=gen)
    y = torch.randint(0, 10, (N,), generator=gen)
    split = Split(x, y)

    class Augmented(Dataset):
        transform = v2.Compose([v2.RandomCrop(32, padding=4), v2.RandomHorizontalFlip()])

        def __len__(self) -> int:
            return N

        def __getitem__(self, i: int):
            return self.transform(x[i]), y[i]

    rows = []
    for augmenting, target in ((False, ">= 10"), (True, ">= 2")):
        loader = DataLoader(Augmented() if augmenting else TensorDataset(x, y),
                            batch_size=BATCH, shuffle=True, generator=gen)
        padding, flip = (4, True) if augmenting else (0, False)

        def engine(padding: int = padding, flip: bool = flip) -> None:
            for _ in range(EPOCHS):
                order = torch.randperm(N, generator=gen)
                for _batch in batches_of(split, order, BATCH, padding, flip, gen):
                    pass

        def dataloader(loader: DataLoader = loader) -> None:
            for _ in range(EPOCHS):
                for _batch in loader:
                    pass

        samples = alternate(timed(engine), timed(dataloader), rounds=1 if QUICK else 5)
        name = "data path, " + ("with augmentation" if augmenting else "no augmentation")
        rows.append(row_from(samples, name=f"{name} ({N:,} CIFAR-sized images)",
                             a_label="device-resident", b_label="DataLoader", unit="s",
                             ratio="B/A", target=target))
    report("datapath", rows)
    return rows


if __name__ == "__main__":
    main()
