from speed_train.eval.olmes import EvalError
from speed_train.eval.run import main

if __name__ == "__main__":
    try:
        main()
    except EvalError as e:
        raise SystemExit(f"error: {e}") from None
