fn main() {
    std::process::exit(lb_userspace::cli::main());
}
