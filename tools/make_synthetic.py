"""Generate the synthetic multi-task dataset (see mtvision/data/synthetic.py for the layout and label rules).

Example::

    python tools/make_synthetic.py --out data/synthetic --seed 0
    python tools/make_synthetic.py --out data/synthetic_shared --shared-images --force
"""
import argparse
import logging

from mtvision.data.synthetic import ensure_synthetic


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--out', default='data/synthetic', help='dataset root (default: %(default)s)')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--num-train', type=int, default=2000, help='images per task in the train split')
    parser.add_argument('--num-val', type=int, default=200, help='images per task in the val split')
    parser.add_argument('--image-size', type=int, default=64)
    parser.add_argument('--num-classes', type=int, default=6)
    parser.add_argument('--shared-images', action='store_true',
                        help='one image set carrying every label type (normals and multi-label lists too) '
                             'instead of one set per task')
    parser.add_argument('--force', action='store_true', help='regenerate even if an identical dataset exists')
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format='%(asctime)s %(levelname)s %(message)s')
    meta = ensure_synthetic(args.out, seed=args.seed, num_train=args.num_train, num_val=args.num_val,
                            image_size=args.image_size, num_classes=args.num_classes,
                            shared_images=args.shared_images, force=args.force)
    logging.info('dataset at %s: %d classes %s, %d train / %d val images per task', args.out, meta['num_classes'],
                 meta['classes'], meta['num_train'], meta['num_val'])


if __name__ == '__main__':
    main()
