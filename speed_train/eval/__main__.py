from speed_train.eval.run import cli

if __name__ == "__main__":
    cli()
