// The one translation unit that compiles CLI11 (cli.hpp says why).
#include "cli/cli.hpp"

#include <CLI/CLI.hpp>

#include <algorithm>
#include <iostream>
#include <utility>

namespace chorus::cli {
namespace {

// CLI11's generated usage line cannot say that a program follows the options.
class UsageFormatter : public CLI::Formatter {
 public:
  explicit UsageFormatter(std::string line) : line_(std::move(line)) {}
  std::string make_usage(const CLI::App*, std::string) const override { return line_ + "\n"; }

 private:
  std::string line_;
};

bool integral(const CLI::Option* o) {
  const std::string t = o->get_type_name();
  return t == "INT" || t == "UINT";
}

}  // namespace

Option& Option::required() {
  o_->required();
  return *this;
}

Option& Option::show_default() {
  o_->capture_default_str();
  return *this;
}

Option& Option::range(double lo, double hi) {
  // An integer option gets an integer range, so that --help says "INT in
  // [1 - 4096]" and 2.5 is refused rather than compared.
  if (integral(o_))
    o_->check(CLI::Range(static_cast<long long>(lo), static_cast<long long>(hi)));
  else
    o_->check(CLI::Range(lo, hi));
  return *this;
}

Option& Option::positive() {
  o_->check(CLI::PositiveNumber);
  return *this;
}

Option& Option::non_negative() {
  o_->check(CLI::NonNegativeNumber);
  return *this;
}

Option& Option::one_of(std::initializer_list<const char*> choices) {
  o_->check(CLI::IsMember(std::vector<std::string>(choices.begin(), choices.end())));
  return *this;
}

Option& Option::excludes(Option other) {
  o_->excludes(other.o_);
  return *this;
}

Option& Option::one_value_per_use() {
  o_->allow_extra_args(false);
  return *this;
}

std::size_t Option::count() const { return o_->count(); }

Parser::Parser(const std::string& description, const std::string& name)
    : app_(std::make_unique<CLI::App>(description, name)) {}

Parser::~Parser() = default;

template <class T>
Option Parser::add(const std::string& names, T& target, const std::string& help) {
  return Option(app_->add_option(names, target, help));
}

template Option Parser::add<int>(const std::string&, int&, const std::string&);
template Option Parser::add<long>(const std::string&, long&, const std::string&);
template Option Parser::add<unsigned long>(const std::string&, unsigned long&, const std::string&);
template Option Parser::add<unsigned long long>(const std::string&, unsigned long long&,
                                                const std::string&);
template Option Parser::add<std::uint16_t>(const std::string&, std::uint16_t&, const std::string&);
template Option Parser::add<double>(const std::string&, double&, const std::string&);
template Option Parser::add<std::string>(const std::string&, std::string&, const std::string&);
template Option Parser::add<std::vector<std::string>>(const std::string&, std::vector<std::string>&,
                                                      const std::string&);

Option Parser::flag(const std::string& names, bool& target, const std::string& help) {
  return Option(app_->add_flag(names, target, help));
}

Option Parser::get(const std::string& name) const { return Option(app_->get_option(name)); }

void Parser::footer(const std::string& text) { app_->footer(text); }

void Parser::usage(const std::string& line) {
  app_->formatter(std::make_shared<UsageFormatter>(line));
}

void Parser::stop_at_first_positional() { app_->prefix_command(); }

std::optional<int> Parser::parse(int argc, char** argv, bool report) {
  return run(nullptr, argc, argv, report);
}

std::optional<int> Parser::parse(const std::vector<std::string>& args, bool report) {
  return run(&args, 0, nullptr, report);
}

std::optional<int> Parser::run(const std::vector<std::string>* args, int argc, char** argv,
                               bool report) {
  try {
    if (args != nullptr) {
      std::vector<std::string> reversed(args->rbegin(), args->rend());  // CLI11's order
      app_->parse(reversed);
    } else {
      app_->parse(argc, argv);
    }
  } catch (const CLI::ParseError& e) {
    if (!report) return e.get_exit_code();
    return app_->exit(e, std::cout, std::cerr);
  }
  return std::nullopt;
}

std::vector<std::string> Parser::remaining() const { return app_->remaining(); }

}  // namespace chorus::cli
